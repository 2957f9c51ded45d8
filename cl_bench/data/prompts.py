"""Token-level data: prompts through the chat template, labels, truncation, batching.

Rules (docs/design.md §8): exactly one BOS; the answer's end token is a training target;
the prompt is masked from the loss (configurable); targets are never truncated. A prompt too long
for its budget loses tokens from the middle of its INPUT field only (`Example.input_span`: the
task's input, e.g. SuperNI's "Input: ..." or a CL-benchmark sentence; the whole user message for
families without one), never the chat template (system block, role headers, the assistant header)
nor the task definition: `encode_prompt` finds the field's tokens through the tokenizer's offsets,
`fit_prompt` cuts them. Only when the field alone cannot absorb the cut is the rest cut in the
middle as well (counted as "instruction" cuts, per task in results.json `prompt_truncation`).

Prompts render deterministically (`PromptFormat`, config `evaluation.prompt`): chat templates that
print today's date (Llama-3.x writes "Today Date: <date>" into a system block of every prompt,
through `date_string` or transformers' `strftime_now`) get a fixed, recorded date instead, so token
ids never change with the calendar; the system message is a config choice. Every place that
applies a chat template (training, evaluation, gradient capture, mining, lm-eval's GP/IP) goes
through `PromptFormat.chat_template_kwargs`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import torch

from ..infra.errors import ConfigError
from .tasks.base import Example, TaskData

# Llama-3.x templates fall back to this date when `strftime_now` is undefined; the default here.
# A tokenized training batch: input_ids, attention_mask, labels (prompt masked with -100).
Batch = dict[str, torch.Tensor]
DEFAULT_DATE_STRING = "26 Jul 2024"
DATE_FORMAT = "%d %b %Y"  # how Llama-3.x templates print the date ("26 Jul 2024")
PROMPT_FORMATS = ("chat_template", "slice_paper")

# The SLICE authors' hand-written Llama-3 prompt (their cl_lora/load_dataset.py): user turn(s) and the
# assistant header, no system block unless a system message is configured.
SLICE_PAPER_TEMPLATE = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
_LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_STRFTIME_CALL = re.compile(r"strftime_now\(\s*(['\"])([^'\"]*)\1\s*\)")


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt becomes text: the tokenizer's chat template (or the SLICE authors' Llama-3
    format), an optional system message, and the fixed date templates print.

    use_chat_template=False renders the bare prompt text (no template, no system message).
    `system`: None passes no system message (the template adds its own default, if any);
    a string is sent as the system turn of every prompt.
    """

    use_chat_template: bool = True
    format: str = "chat_template"
    system: str | None = None
    date_string: str = DEFAULT_DATE_STRING

    def __post_init__(self) -> None:
        if self.format not in PROMPT_FORMATS:
            raise ConfigError(
                f"evaluation.prompt.format={self.format!r} is invalid; valid: {', '.join(PROMPT_FORMATS)}"
            )
        if self.system is not None and not isinstance(self.system, str):
            raise ConfigError(f"evaluation.prompt.system={self.system!r} is invalid; valid: null or a text")
        if self.system is not None and not self.use_chat_template:
            raise ConfigError(
                "evaluation.prompt.system is set but evaluation.use_chat_template=false renders bare "
                "prompts without a system turn; set one of them back"
            )
        try:
            ok = datetime.strptime(str(self.date_string), DATE_FORMAT).strftime(DATE_FORMAT) == self.date_string
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(
                f"evaluation.prompt.date_string={self.date_string!r} is invalid; valid: a date as Llama-3.x "
                f"templates print it, e.g. {DEFAULT_DATE_STRING!r} ({DATE_FORMAT})"
            )

    def template_for(self, tokenizer) -> str | None:
        """The Jinja chat template to render with (None = no template: plain prompt text)."""
        if not self.use_chat_template:
            return None
        if self.format == "slice_paper":
            return SLICE_PAPER_TEMPLATE
        if not getattr(tokenizer, "chat_template", None):
            return None
        return fixed_date_template(tokenizer.get_chat_template(), self.date_string)

    def chat_template_kwargs(self, tokenizer) -> dict[str, Any]:
        """Keyword arguments for `tokenizer.apply_chat_template` (or lm-eval's chat_template_args)
        that make the rendering independent of the calendar."""
        template = self.template_for(tokenizer)
        return {} if template is None else {"chat_template": template, "date_string": self.date_string}

    def check(self, tokenizer) -> None:
        """ConfigError if this format cannot be rendered with `tokenizer`."""
        if self.use_chat_template and self.format == "slice_paper":
            vocab = tokenizer.get_vocab()
            missing = [t for t in _LLAMA3_TOKENS if t not in vocab]
            if missing:
                raise ConfigError(
                    f"evaluation.prompt.format=slice_paper writes Llama-3 turn headers but the tokenizer has no "
                    f"{', '.join(missing)}; use evaluation.prompt.format=chat_template"
                )
        template = self.template_for(tokenizer)
        if template is not None and re.search(r"strftime_now\s*\(", template):
            raise ConfigError(
                "the model's chat template calls strftime_now with a computed format, so its prompts would "
                "depend on the calendar; set evaluation.prompt.format=slice_paper or evaluation.use_chat_template=false"
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "use_chat_template": self.use_chat_template,
            "format": self.format,
            "system": self.system,
            "date_string": self.date_string,
        }


def prompt_format(ev_cfg: Any) -> PromptFormat:
    """PromptFormat from the `evaluation` config group (use_chat_template + prompt.*)."""
    prompt = ev_cfg.get("prompt") or {}
    unknown = sorted(set(prompt) - {"format", "system", "date_string"})
    if unknown:
        raise ConfigError(f"evaluation.prompt.{unknown[0]} is not a known key; valid: format, system, date_string")
    use = ev_cfg.get("use_chat_template", True)
    if not isinstance(use, bool):
        raise ConfigError(f"evaluation.use_chat_template={use!r} is invalid; valid: true, false")
    return PromptFormat(
        use_chat_template=use,
        format=str(prompt.get("format", "chat_template")),
        system=prompt.get("system"),
        date_string=str(prompt.get("date_string", DEFAULT_DATE_STRING)),
    )


@lru_cache(maxsize=16)
def fixed_date_template(template: str, date_string: str) -> str:
    """`template` with every `strftime_now("<format>")` call replaced by the fixed date in that
    format (templates that call it directly, not only through a `date_string` fallback).
    A call with a computed format is left in place; PromptFormat.check refuses it."""
    when = datetime.strptime(date_string, DATE_FORMAT)
    return _STRFTIME_CALL.sub(lambda m: '"' + when.strftime(m.group(2)).replace('"', "") + '"', template)


# Tokens kept from the start of a prompt when its middle is cut (BOS, role header, instruction).
_HEAD_KEEP = 24


def prompt_messages(example: Example) -> list[dict]:
    if example.messages:
        return [dict(m) for m in example.messages]
    return [{"role": "user", "content": example.prompt}]


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def as_prompt_format(fmt: PromptFormat | bool) -> PromptFormat:
    """A PromptFormat; a bool means the default format with/without the chat template."""
    return fmt if isinstance(fmt, PromptFormat) else PromptFormat(use_chat_template=bool(fmt))


def render_prompt_text(tokenizer, example: Example, fmt: PromptFormat | bool = True) -> str:
    """The prompt as text: chat-templated (fixed date, configured system message) or bare."""
    fmt = as_prompt_format(fmt)
    kwargs = fmt.chat_template_kwargs(tokenizer)
    if not kwargs:
        return example.prompt
    messages = prompt_messages(example)
    if fmt.system is not None and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": fmt.system}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def render_prompt_ids(tokenizer, example: Example, fmt: PromptFormat | bool = True) -> list[int]:
    """Prompt token ids with exactly one BOS (when the model uses one) and no double BOS."""
    text = render_prompt_text(tokenizer, example, fmt)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None:
        while len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids.pop(0)
        if _adds_bos(tokenizer) and (not ids or ids[0] != bos):
            ids.insert(0, bos)
    return ids


def target_ids(tokenizer, target: str) -> list[int]:
    """Answer tokens followed by the end-of-turn token, which is trained so the model stops."""
    ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None:
        ids.append(eos)
    return ids


def truncate_middle(ids: list[int], budget: int) -> list[int]:
    """The first min(_HEAD_KEEP, budget // 2) and the last tokens of `ids`, `budget` in all."""
    if len(ids) <= budget:
        return ids
    head = min(_HEAD_KEEP, budget // 2)
    return ids[:head] + ids[len(ids) - (budget - head) :]


@dataclass(frozen=True)
class PromptIds:
    """A rendered prompt's token ids and the token range [cut_from, cut_to) of its input field,
    the only tokens a truncation may drop (cut_from == cut_to: none known)."""

    ids: list[int]
    cut_from: int
    cut_to: int

    @property
    def head(self) -> int:
        """Tokens that must survive any cut: template, definition, the field's neighbours."""
        return len(self.ids) - (self.cut_to - self.cut_from)


def _input_chars(text: str, example: Example) -> tuple[int, int] | None:
    """Character range of the example's input field in the rendered prompt `text` (None: not found)."""
    user = [m for m in example.messages or () if m.get("role") == "user"]
    content = str(user[-1].get("content", "")) if user else example.prompt
    start, end = example.input_span if (example.input_span and not user) else (0, len(content))
    stripped = content.strip()  # templates may trim the message
    at = text.rfind(stripped) if stripped else -1
    if at < 0:
        return None
    lead = len(content) - len(content.lstrip())
    return at + max(0, start - lead), at + min(len(stripped), end - lead)


def encode_prompt(tokenizer, example: Example, fmt: PromptFormat | bool = True) -> PromptIds:
    """`render_prompt_ids` with the token range of the input field (`_input_chars`, through the
    fast tokenizer's offsets; a tokenizer without offsets gives an empty range)."""
    text = render_prompt_text(tokenizer, example, fmt)
    chars = _input_chars(text, example) if getattr(tokenizer, "is_fast", False) else None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=chars is not None)
    ids = list(enc["input_ids"])
    offsets = list(enc["offset_mapping"]) if chars is not None else [(0, 0)] * len(ids)
    bos = tokenizer.bos_token_id
    if bos is not None:
        while len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids.pop(0)
            offsets.pop(0)
        if _adds_bos(tokenizer) and (not ids or ids[0] != bos):
            ids.insert(0, bos)
            offsets.insert(0, (0, 0))
    if chars is None:
        return PromptIds(ids, 0, 0)
    a, b = chars
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s >= a and e <= b]
    return PromptIds(ids, inside[0], inside[-1] + 1) if inside else PromptIds(ids, 0, 0)


def fit_prompt(prompt: PromptIds, budget: int) -> tuple[list[int], str | None]:
    """(ids of at most `budget` tokens, what was cut: None | "input" | "instruction").

    "input": tokens from the middle of the input field only (its start and end survive);
    "instruction": the field alone could not absorb the cut (or is unknown), so it went whole and
    the rest was cut in the middle as well (truncate_middle)."""
    ids, a, b = prompt.ids, prompt.cut_from, prompt.cut_to
    excess = len(ids) - budget
    if excess <= 0:
        return ids, None
    if b - a >= excess:
        keep = b - a - excess
        return ids[: a + keep // 2] + ids[b - (keep - keep // 2) :], "input"
    return truncate_middle(ids[:a] + ids[b:], budget), "instruction"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_truncated: bool
    instruction_cut: bool = False  # the cut went beyond the input field (fit_prompt's "instruction")


def encode_for_training(
    tokenizer, example: Example, max_len: int, mask_prompt: bool = True, fmt: PromptFormat | bool = True
) -> Encoded:
    prompt = encode_prompt(tokenizer, example, fmt)
    answer = target_ids(tokenizer, example.target)
    # The target is never cut; the prompt keeps at least a small budget even for long targets.
    budget = max(max_len - len(answer), min(len(prompt.ids), 2 * _HEAD_KEEP))
    cut, how = fit_prompt(prompt, budget)
    labels = ([-100] * len(cut) if mask_prompt else list(cut)) + answer
    return Encoded(cut + answer, labels, how is not None, how == "instruction")


def collate_training(encoded: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding; pads are masked in attention and labels."""
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id_of(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id


def encode_prompts_left_padded(
    tokenizer, examples: Sequence[Example], max_prompt_len: int, fmt: PromptFormat | bool = True
) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for generation; every row ends at the same position."""
    rows = [prompt_row(tokenizer, ex, max_prompt_len, fmt) for ex in examples]
    return left_padded(rows, pad_id_of(tokenizer))


def prompt_row(tokenizer, example: Example, budget: int, fmt: PromptFormat | bool = True) -> list[int]:
    """The prompt ids generation sees: at most `budget` tokens, cut inside the input field."""
    return fit_prompt(encode_prompt(tokenizer, example, fmt), budget)[0]


def left_padded(rows: Sequence[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Token id rows left-padded to the longest (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


class TrainingEncoder:
    """Encodes a task's training examples once and serves seeded batches from them."""

    def __init__(self, tokenizer, max_len: int, mask_prompt: bool = True, fmt: PromptFormat | bool = True):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.mask_prompt = mask_prompt
        self.prompt = as_prompt_format(fmt)
        self.prompt.check(tokenizer)  # a format the tokenizer cannot render fails before any work
        self.pad_id = pad_id_of(tokenizer)
        self._cache: dict[tuple[str, int], list[Encoded]] = {}

    def encode_task(self, task: TaskData) -> list[Encoded]:
        key = (task.name, id(task))
        if key not in self._cache:
            self._cache[key] = [
                encode_for_training(self.tokenizer, ex, self.max_len, self.mask_prompt, self.prompt)
                for ex in task.train
            ]
        return self._cache[key]

    def order(self, task: TaskData, seed: int, epochs: int = 1) -> list[int]:
        """Example order for `epochs` passes, reshuffled each pass with a seeded generator."""
        n = len(task.train)
        gen = torch.Generator().manual_seed(seed)
        return [i for _ in range(epochs) for i in torch.randperm(n, generator=gen).tolist()]

    def batch(
        self, task: TaskData, indices: Sequence[int], device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        return self.batch_items([(task, i) for i in indices], device)

    def batch_items(
        self, items: Sequence[tuple[TaskData, int]], device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """One batch of training examples given as (task, index into task.train), any tasks."""
        out = collate_training([self.encode_task(task)[i] for task, i in items], self.pad_id)
        return {k: v.to(device) for k, v in out.items()}

    def batches(
        self,
        task: TaskData,
        n_batches: int,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        indices: Sequence[int] | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """`n_batches` batches drawn from task.train only (cycling with reshuffles if needed);
        with `indices` (into task.train, e.g. a replay buffer) only from those examples."""
        pool = list(range(len(task.train))) if indices is None else [int(i) for i in indices]
        if not pool or not all(0 <= i < len(task.train) for i in pool):
            raise ValueError(
                f"task {task.name!r}: batch indices must be a non-empty subset of its {len(task.train)} training examples"
            )
        n = len(pool)
        epochs = max(1, -(-n_batches * batch_size // n))
        gen = torch.Generator().manual_seed(seed)  # the same order as self.order when pool is the whole split
        order = [pool[i] for _ in range(epochs) for i in torch.randperm(n, generator=gen).tolist()]
        for b in range(n_batches):
            yield self.batch(task, order[b * batch_size : (b + 1) * batch_size], device)


def prompt_truncation(
    encoder: TrainingEncoder, tasks: Sequence[TaskData], eval_budget: int, limit: int | None = None
) -> dict[str, dict[str, Any]]:
    """results.json `prompt_truncation`: per task, how many training prompts (at trainer.max_len,
    beside their answers) and evaluated prompts (at `eval_budget` tokens, the first `limit`) lose
    tokens of their input field only ("input_cut") or beyond it ("instruction_cut"), and
    `longest_head`: the most tokens an evaluated prompt holds outside its input field (template +
    instruction), which the evaluation budget must exceed."""
    out = {}
    for task in tasks:
        train = encoder.encode_task(task)
        prompts = [encode_prompt(encoder.tokenizer, ex, encoder.prompt) for ex in task.eval[: limit or None]]
        cuts = [fit_prompt(p, eval_budget)[1] for p in prompts]
        out[task.name] = {
            "train": {
                "prompts": len(train),
                "input_cut": sum(e.prompt_truncated and not e.instruction_cut for e in train),
                "instruction_cut": sum(e.instruction_cut for e in train),
            },
            "eval": {
                "prompts": len(prompts),
                "input_cut": cuts.count("input"),
                "instruction_cut": cuts.count("instruction"),
                "budget": eval_budget,
                "longest_head": max((p.head for p in prompts), default=0),
            },
        }
    return out

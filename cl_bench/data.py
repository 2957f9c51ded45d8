"""Token-level data: prompts through the chat template, labels, truncation, batching.

Rules (shared/DESIGN.md §5): exactly one BOS; the answer's end token is a training target;
the prompt is masked from the loss (configurable); inputs are truncated (in the middle, so the
instruction head and the assistant header survive), targets never are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .tasks.base import Example, TaskData

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


def render_prompt_ids(tokenizer, example: Example, use_chat_template: bool = True) -> list[int]:
    """Prompt token ids with exactly one BOS (when the model uses one) and no double BOS."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            prompt_messages(example), tokenize=False, add_generation_prompt=True
        )
    else:
        text = example.prompt
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
    if len(ids) <= budget:
        return ids
    head = min(_HEAD_KEEP, budget // 2)
    return ids[:head] + ids[len(ids) - (budget - head):]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_truncated: bool


def encode_for_training(
    tokenizer, example: Example, max_len: int, mask_prompt: bool = True, use_chat_template: bool = True
) -> Encoded:
    prompt = render_prompt_ids(tokenizer, example, use_chat_template)
    answer = target_ids(tokenizer, example.target)
    # The target is never cut; the prompt keeps at least a small budget even for long targets.
    budget = max(max_len - len(answer), min(len(prompt), 2 * _HEAD_KEEP))
    cut = truncate_middle(prompt, budget)
    labels = ([-100] * len(cut) if mask_prompt else list(cut)) + answer
    return Encoded(cut + answer, labels, len(cut) < len(prompt))


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
    tokenizer, examples: Sequence[Example], max_prompt_len: int, use_chat_template: bool = True
) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for generation; every row ends at the same position."""
    rows = [truncate_middle(render_prompt_ids(tokenizer, ex, use_chat_template), max_prompt_len) for ex in examples]
    width = max(len(r) for r in rows)
    pad = pad_id_of(tokenizer)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


class TrainingEncoder:
    """Encodes a task's training examples once and serves seeded batches from them."""

    def __init__(self, tokenizer, max_len: int, mask_prompt: bool = True, use_chat_template: bool = True):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.mask_prompt = mask_prompt
        self.use_chat_template = use_chat_template
        self.pad_id = pad_id_of(tokenizer)
        self._cache: dict[tuple[str, int], list[Encoded]] = {}

    def encode_task(self, task: TaskData) -> list[Encoded]:
        key = (task.name, id(task))
        if key not in self._cache:
            self._cache[key] = [
                encode_for_training(self.tokenizer, ex, self.max_len, self.mask_prompt, self.use_chat_template)
                for ex in task.train
            ]
        return self._cache[key]

    def order(self, task: TaskData, seed: int, epochs: int = 1) -> list[int]:
        """Example order for `epochs` passes, reshuffled each pass with a seeded generator."""
        n = len(task.train)
        gen = torch.Generator().manual_seed(seed)
        return [i for _ in range(epochs) for i in torch.randperm(n, generator=gen).tolist()]

    def batch(self, task: TaskData, indices: Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return self.batch_items([(task, i) for i in indices], device)

    def batch_items(
        self, items: Sequence[tuple[TaskData, int]], device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """One batch of training examples given as (task, index into task.train), any tasks."""
        out = collate_training([self.encode_task(task)[i] for task, i in items], self.pad_id)
        return {k: v.to(device) for k, v in out.items()}

    def batches(
        self, task: TaskData, n_batches: int, batch_size: int, seed: int, device: torch.device | str = "cpu",
        indices: Sequence[int] | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """`n_batches` batches drawn from task.train only (cycling with reshuffles if needed);
        with `indices` (into task.train, e.g. a replay buffer) only from those examples."""
        pool = list(range(len(task.train))) if indices is None else [int(i) for i in indices]
        if not pool or not all(0 <= i < len(task.train) for i in pool):
            raise ValueError(f"task {task.name!r}: batch indices must be a non-empty subset of its {len(task.train)} training examples")
        n = len(pool)
        epochs = max(1, -(-n_batches * batch_size // n))
        gen = torch.Generator().manual_seed(seed)  # the same order as self.order when pool is the whole split
        order = [pool[i] for _ in range(epochs) for i in torch.randperm(n, generator=gen).tolist()]
        for b in range(n_batches):
            yield self.batch(task, order[b * batch_size:(b + 1) * batch_size], device)

"""Seen-task evaluation: batched greedy generation with left padding and the KV cache.

The continuation starts at the *padded* input length, the same for every row of a batch
(the SLICE authors' code cut at each row's unpadded length, leaking prompt tails into the
predictions of every row but the longest, so its scores depended on the batch; docs/design.md §8).

Each prediction is scored against every reference of its example by the task's metric under the
configured evaluation.protocol (TaskData.metric_for; scoring.score takes the best reference).

Speed: prompts are tokenized once and batched by token length (longest first, so an
out-of-memory shows on the first batch); generation stops for the whole batch once every row has
emitted an end token (the tokenizer's and the model's generation-config ones); a task scored by
exact match generates at most its longest reference in tokens + `reference_margin` new tokens
(capped by max_new_tokens: a longer prediction could only match after its normalisation strips
more than the margin; tasks scored by overlap metrics always get max_new_tokens); on CUDA
out-of-memory the batch size is halved and the batch retried. With a token budget
(evaluation.max_batch_tokens; the CPU default) the length-sorted prompts are cut where padded
prompt tokens plus each batch's decode steps cost least (plan_batches), so the prefill, which bounds
generation on a CPU, feeds far less padding; the predictions are those of one-by-one generation
(tested), as with any batching. Row 0 may come from a prediction cache (evaluation/cache.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.batching import plan_groups
from ..data.prompts import PromptFormat, left_padded, pad_id_of, prompt_row, target_ids
from ..data.tasks.base import Example, TaskData
from .cache import PredictionCache
from .scoring import score

# Metrics that compare the whole (normalised) prediction with a reference: a budget from the
# longest reference cannot change their score (new_token_budget).
WHOLE_ANSWER_METRICS = ("exact_match", "ni_exact_match", "slice_exact_match")


def end_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and every EOS id of the model's generation config (Llama-3 Instruct
    ends turns with <|eot_id|> and lists several), in that order, without repeats."""
    ids: list[int] = []
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in [tokenizer.eos_token_id, *(gen if isinstance(gen, (list, tuple)) else [gen])]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


def new_token_budget(tokenizer, examples: Sequence[Example], cap: int, margin: int | None) -> int:
    """min(cap, longest reference of `examples` in tokens (its end token included) + margin);
    `cap` when margin is None."""
    if margin is None or not examples:
        return cap
    longest = max(len(target_ids(tokenizer, ref)) for ex in examples for ref in ex.all_references)
    return max(1, min(cap, longest + int(margin)))


@torch.no_grad()
def _generate_rows(
    model, tokenizer, rows: Sequence[list[int]], *, max_new_tokens: int, device, synced: bool = False
) -> list[list[int]]:
    """Greedy continuations (token ids after the padded prompt) of left-padded prompt rows.
    `synced`: keep running forward passes until every rank is done (a sharded model's passes are
    collective; transformers' synced_gpus)."""
    batch = {k: v.to(device) for k, v in left_padded(rows, pad_id_of(tokenizer)).items()}
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=pad_id_of(tokenizer),
        eos_token_id=end_token_ids(model, tokenizer),
        temperature=None,
        top_p=None,
        top_k=None,
        **({"synced_gpus": True} if synced else {}),
    )
    return out[:, batch["input_ids"].shape[1] :].tolist()


def generate(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    max_prompt_len: int,
    device: torch.device,
    prompt: PromptFormat | bool = True,
) -> list[str]:
    """Greedy predictions for `examples` as one batch (decoded, special tokens dropped, stripped)."""
    rows = [prompt_row(tokenizer, ex, max_prompt_len, prompt) for ex in examples]
    conts = _generate_rows(model, tokenizer, rows, max_new_tokens=max_new_tokens, device=device)
    return [tokenizer.decode(c, skip_special_tokens=True).strip() for c in conts]


# evaluation.max_batch_tokens=auto: a token budget on the CPU, where the prefill's padded tokens
# bound generation; none on CUDA, where decode steps do and the largest batches are fastest.
AUTO_CPU_BATCH_TOKENS = 16384


def eval_token_budget(value, device: torch.device) -> int | None:
    """evaluation.max_batch_tokens resolved for `device`: "auto" -> AUTO_CPU_BATCH_TOKENS on the
    CPU, None elsewhere; None or an int as given."""
    if value == "auto":
        return AUTO_CPU_BATCH_TOKENS if device.type == "cpu" else None
    return None if value is None else int(value)


def plan_batches(
    lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None, overhead_tokens: int = 0
) -> list[list[int]]:
    """Generation batches (indices into `lengths`, the prompt lengths in tokens), longest first.

    max_batch_tokens None: runs of `batch_size` prompts of the longest-first order (ties by index).
    A token budget: the same order cut where Σ_batches (rows · longest prompt + overhead_tokens) is
    least, with rows · longest <= max_batch_tokens and rows <= batch_size (data/batching.py):
    short prompts share big batches, long ones small, and the prefill feeds less padding.
    `overhead_tokens` is the fixed cost of one more batch (its decode steps) in prompt tokens."""
    if max_batch_tokens is None:
        order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
        return [order[at : at + batch_size] for at in range(0, len(order), batch_size)]
    return plan_groups(lengths, int(max_batch_tokens), int(overhead_tokens), max_rows=batch_size)


def evaluate_task(
    model,
    tokenizer,
    task: TaskData,
    *,
    batch_size: int,
    max_new_tokens: int,
    max_prompt_len: int,
    device: torch.device,
    prompt: PromptFormat | bool = True,
    limit: int | None = None,
    progress: bool = True,
    protocol: str = "per_task",
    reference_margin: int | None = None,
    max_batch_tokens: int | None = None,
    decode_step_tokens: int = 0,
    stats: dict | None = None,
    dist=None,
    cache: PredictionCache | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """Score in percent and one record per example (prompt, target, prediction, score; and all
    references when there are several). `protocol` picks the metric (TaskData.metric_for).

    `batch_size` is the largest batch tried (halved on CUDA out-of-memory); `max_batch_tokens`
    (None = off) cuts the batches by a token budget (plan_batches), where one more batch costs
    its new-token budget x `decode_step_tokens` prompt tokens (its decode steps);
    `reference_margin` (None = off) caps the new tokens of exact-match tasks at their longest
    reference + margin (new_token_budget).
    `stats`, if given, receives what was run: examples, batches, batch_size (the last used),
    prompt_tokens, fed_prompt_tokens (rows x padded width, summed over batches), new_tokens_cap,
    generated_tokens (continuation positions, padding included), seconds.
    `dist` (distributed.Dist, data-parallel runs): the batches one process would run are dealt
    round-robin to the ranks and the predictions gathered in order, so each prediction comes from
    the same batch as in one process; every rank returns the whole task's score and records.
    With a sharded base (dist.sharded) every rank runs as many batches as the busiest one (a short
    share repeats its last batch and drops the result) and generation is synced over the ranks.
    `cache` (evaluation/cache.py; one process only): the predictions are read from it when it
    holds this generation, else computed and stored (stats["cache"]: hit | miss).
    """
    metric = task.metric_for(protocol)
    examples = task.eval[:limit] if limit else task.eval
    start = time.perf_counter()
    rows = [prompt_row(tokenizer, ex, max_prompt_len, prompt) for ex in examples]
    margin = reference_margin if metric in WHOLE_ANSWER_METRICS else None
    budget = new_token_budget(tokenizer, examples, max_new_tokens, margin)
    was_training = model.training
    model.eval()
    bs = max(1, int(batch_size))
    # Similar lengths per batch waste less compute on padding; results are put back in order.
    overhead = int(decode_step_tokens) * budget  # one more batch: its decode steps, in prompt tokens
    chunks = plan = plan_batches([len(r) for r in rows], bs, max_batch_tokens, overhead)
    if dist is not None and dist.world > 1:
        chunks = dist.shard(plan)
    filler = chunks[-1] if chunks else plan[0] if plan else []  # sharded: what an idle rank repeats
    key = predictions = None
    if cache is not None and (dist is None or dist.world == 1):
        end, pad = end_token_ids(model, tokenizer), pad_id_of(tokenizer)
        key = cache.key(rows=rows, plan=plan, budget=budget, end_ids=end, pad_id=pad)
        predictions = cache.load(key, len(rows))
    if predictions is not None:
        run = {"batches": 0, "batch_size": bs, "fed_prompt_tokens": 0, "generated_tokens": 0, "cache": "hit"}
    else:
        predictions, run = _run_batches(
            model, tokenizer, rows, chunks, filler, bs, budget, device, task.name, progress, dist
        )
        if key is not None:
            cache.save(key, predictions, {"task": task.name, "examples": len(rows)})
            run["cache"] = "miss"
    model.train(was_training)
    if dist is not None and dist.world > 1:
        mine = {i for chunk in chunks for i in chunk}
        for share in dist.gather({i: predictions[i] for i in mine}, f"gathering the predictions of {task.name}"):
            for i, pred in share.items():
                predictions[i] = pred
    if stats is not None:
        stats.update(
            examples=len(examples),
            **run,
            prompt_tokens=sum(map(len, rows)),
            new_tokens_cap=budget,
            seconds=time.perf_counter() - start,
        )
    records = []
    for ex, pred in zip(examples, predictions):
        value = score(metric, pred, ex.all_references, task.labels, source=ex.source)
        record = {"id": ex.id, "prompt": ex.prompt, "target": ex.target, "prediction": pred, "score": value}
        if len(ex.all_references) > 1:
            record["references"] = list(ex.all_references)
        records.append(record)
    mean = 100.0 * sum(r["score"] for r in records) / max(1, len(records))
    return mean, records


def _run_batches(
    model, tokenizer, rows, chunks, filler, bs: int, budget: int, device, name: str, progress: bool, dist
) -> tuple[list[str], dict]:
    """Generate every chunk of `rows` (this rank's share); returns the decoded predictions (""
    for rows of other ranks) and what ran: batches, batch_size (the cap after any out-of-memory
    halving), fed_prompt_tokens, generated_tokens. On out-of-memory the cap is halved and the
    rest of the rows is re-cut into runs of the halved size, in order."""
    predictions: list[str] = [""] * len(rows)
    sharded = dist is not None and dist.sharded
    idle = 0  # sharded: batches this rank runs only so that every rank runs the same number
    if sharded:
        idle = dist.max_over_ranks(len(chunks), f"counting the batches of {name}") - len(chunks)
    queue = [list(c) for c in chunks]
    bar = tqdm(total=sum(map(len, queue)), desc=f"eval {name}", leave=False, disable=not progress)
    batches = generated = fed = 0
    while queue:
        idx = queue[0]
        try:
            conts = _generate_rows(
                model, tokenizer, [rows[i] for i in idx], max_new_tokens=budget, device=device, synced=sharded
            )
        except torch.OutOfMemoryError:
            if bs == 1 or sharded:  # a sharded rank cannot re-batch alone: its passes are collective
                raise
            bs //= 2  # the largest batch that fits: keep the halved size for the rest
            rest = [i for chunk in queue for i in chunk]
            queue = [rest[at : at + bs] for at in range(0, len(rest), bs)]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        queue.pop(0)
        for i, c in zip(idx, conts):
            predictions[i] = tokenizer.decode(c, skip_special_tokens=True).strip()
        generated += len(idx) * (len(conts[0]) if conts else 0)
        fed += len(idx) * max(len(rows[i]) for i in idx)
        batches += 1
        bar.update(len(idx))
    for _ in range(idle):
        _generate_rows(model, tokenizer, [rows[i] for i in filler], max_new_tokens=budget, device=device, synced=True)
    bar.close()
    return predictions, {"batches": batches, "batch_size": bs, "fed_prompt_tokens": fed, "generated_tokens": generated}

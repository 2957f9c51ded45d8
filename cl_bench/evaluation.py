"""Seen-task evaluation: batched greedy generation with left padding and the KV cache.

The continuation starts at the *padded* input length, the same for every row of a batch
(the SLICE authors' code cut at each row's unpadded length, leaking prompt tails into the
predictions of every row but the longest; shared/reference/slice-reference.md §5.1).

Each prediction is scored against every reference of its example by the task's metric under the
configured evaluation.protocol (TaskData.metric_for; scoring.score takes the best reference).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .data import PromptFormat, encode_prompts_left_padded, pad_id_of
from .scoring import score
from .tasks.base import Example, TaskData


@torch.no_grad()
def generate(
    model, tokenizer, examples: Sequence[Example], *, max_new_tokens: int, max_prompt_len: int,
    device: torch.device, prompt: PromptFormat | bool = True,
) -> list[str]:
    batch = encode_prompts_left_padded(tokenizer, examples, max_prompt_len, prompt)
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
        pad_token_id=pad_id_of(tokenizer), eos_token_id=tokenizer.eos_token_id,
        temperature=None, top_p=None, top_k=None,
    )
    continuation = out[:, batch["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in continuation]


def evaluate_task(
    model, tokenizer, task: TaskData, *, batch_size: int, max_new_tokens: int, max_prompt_len: int,
    device: torch.device, prompt: PromptFormat | bool = True, limit: int | None = None, progress: bool = True,
    protocol: str = "per_task",
) -> tuple[float, list[dict[str, Any]]]:
    """Score in percent and one record per example (prompt, target, prediction, score; and all
    references when there are several). `protocol` picks the metric (TaskData.metric_for)."""
    metric = task.metric_for(protocol)
    examples = task.eval[:limit] if limit else task.eval
    # Similar lengths per batch waste less compute on padding; results are put back in order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    predictions: list[str] = [""] * len(examples)
    was_training = model.training
    model.eval()
    bar = tqdm(range(0, len(order), batch_size), desc=f"eval {task.name}", leave=False, disable=not progress)
    for start in bar:
        idx = order[start:start + batch_size]
        outs = generate(
            model, tokenizer, [examples[i] for i in idx], max_new_tokens=max_new_tokens,
            max_prompt_len=max_prompt_len, device=device, prompt=prompt,
        )
        for i, text in zip(idx, outs):
            predictions[i] = text
    model.train(was_training)
    records = []
    for ex, pred in zip(examples, predictions):
        value = score(metric, pred, ex.all_references, task.labels, source=ex.source)
        record = {"id": ex.id, "prompt": ex.prompt, "target": ex.target, "prediction": pred, "score": value}
        if len(ex.all_references) > 1:
            record["references"] = list(ex.all_references)
        records.append(record)
    mean = 100.0 * sum(r["score"] for r in records) / max(1, len(records))
    return mean, records

"""What several bench phases share: `isolated` (one measurement in its own forked process on the
CPU, so each has its own memory high-water mark) and the SLICE authors' recipe as the bench models
it (`reference_train`: HF Trainer defaults; `authors_eval`: batch-8 generation in data order;
`forced_generate`: generation of a fixed number of tokens). Imported by the phase modules, never
the other way (bench/dispatch.py runs the phases by name).
"""

from __future__ import annotations

import math
import os
import traceback
from collections.abc import Callable

import torch

from .setup import Bench, ModelSpec


def isolated(b: Bench, fn: Callable[[], list[dict]]) -> list[dict]:
    """fn() in a forked child on the CPU (its own RSS high-water mark), in-process on CUDA
    (a forked child cannot use CUDA; CUDA peaks are reset per phase instead)."""
    if b.device.type == "cuda" or not hasattr(os, "fork"):
        out = fn()
        if b.device.type == "cuda":
            torch.cuda.empty_cache()
        return out
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def run() -> None:
        torch.set_num_threads(b.threads)
        try:
            child.send(("ok", fn()))
        except BaseException:  # noqa: BLE001 - reported by the parent
            child.send(("error", traceback.format_exc()))

    proc = ctx.Process(target=run)
    proc.start()
    status, payload = parent.recv()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"bench phase failed in its child process:\n{payload}")
    return payload


def reference_train(
    model, encoder, task, seed: int, steps: int, bs: int, accum: int, device, autocast: bool | None = None
) -> dict:
    """The authors' recipe (HF Trainer defaults): micro-batches of `bs` padded to their longest,
    HF's loss over every position's logits, the foreach AdamW, the loss read every micro-batch.
    `autocast`: bf16 autocast (None: on CUDA only, as the authors ran)."""
    from transformers import get_linear_schedule_with_warmup

    from ..train.loss import trained_tokens

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(0.01 * steps), steps)
    order = encoder.order(task, seed, epochs=math.ceil(steps * bs * accum / len(task.train)) + 1)
    autocast = device.type == "cuda" if autocast is None else autocast
    losses, tokens, fed = [], 0, 0
    model.train()
    for step in range(steps):
        micro = [
            encoder.batch(task, order[(step * accum + m) * bs : (step * accum + m + 1) * bs], device)
            for m in range(accum)
        ]
        n_items = sum(trained_tokens(x) for x in micro)
        lm = 0.0
        for x in micro:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(**x, num_items_in_batch=n_items).loss
            loss.backward()
            lm += float(loss.detach())  # a host sync per micro-batch, as the Trainer's logging did
            tokens += int(x["attention_mask"].sum())
            fed += x["input_ids"].numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(lm)
    model.eval()
    return {"loss_curve": losses, "tokens": tokens, "fed_tokens": fed, "examples": steps * bs * accum}


@torch.no_grad()
def forced_generate(model, tok, rows, n: int, device) -> None:
    from ..data.prompts import left_padded, pad_id_of

    batch = {k: v.to(device) for k, v in left_padded(rows, pad_id_of(tok)).items()}
    model.generate(
        **batch,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=pad_id_of(tok),
        eos_token_id=tok.eos_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )


@torch.no_grad()
def authors_eval(model, tok, task, spec: ModelSpec, device, pad: int, stats: dict) -> float:
    from ..data.prompts import encode_prompts_left_padded
    from ..evaluation.scoring import score

    preds, conts = [], []
    for i in range(0, len(task.eval), 8):
        batch = {
            k: v.to(device)
            for k, v in encode_prompts_left_padded(tok, task.eval[i : i + 8], spec.eval_prompt_len).items()
        }
        out = model.generate(
            **batch,
            max_new_tokens=spec.eval_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        cont = out[:, batch["input_ids"].shape[1] :]
        conts += list(cont)
        stats["generated_tokens"] += cont.numel()
        stats["prompt_tokens"] += int(batch["attention_mask"].sum())
        preds += [tok.decode(c, skip_special_tokens=True).strip() for c in cont]
    if "predictions" in stats:  # also cut at stats["cut"] new tokens: greedy decoding's prefix
        stats["predictions"] += preds
        cut = stats.get("cut")
        stats["predictions_cut"] += [tok.decode(c[:cut], skip_special_tokens=True).strip() for c in conts]
    metric = task.metric_for("per_task")
    return 100.0 * sum(score(metric, p, ex.all_references, task.labels) for p, ex in zip(preds, task.eval)) / len(preds)

"""One stage's training loop.

Hand-written rather than HF Trainer because the runner needs, per step, the regularizer's
named loss terms and hooks (stage.py lists them in order), a NaN/inf guard that stops the stage
cleanly, and in-stage checkpoints whose data position and RNG states resume bit-identically
on CPU.

Gradient accumulation is exact: the LM loss of each micro-batch is its summed token loss
divided by the trained tokens of the whole optimizer step (HF's `num_items_in_batch`), so
batch 16 × accum 1 and 8 × 2 and 4 × 4 of the same examples give the same gradient; the
logged "lm" is the per-token mean over the step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .data import TrainingEncoder
from .errors import TrainingError
from .regularizers.base import Regularizer
from .stage import StageContext, trained_tokens
from .tasks.base import TaskData


@dataclass
class TrainState:
    """Everything a resumed stage needs besides the model's frozen weights."""

    step: int = 0
    losses: list[dict[str, float]] = field(default_factory=list)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def build_optimizer(model, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and HF's linear schedule: warmup from 0 over ceil(warmup_ratio·total) steps (HF
    Trainer's count), then linear decay to 0 at `total_steps` (transformers'
    get_linear_schedule_with_warmup itself, so the two cannot drift apart)."""
    from transformers import get_linear_schedule_with_warmup

    params = list(trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay), betas=(0.9, 0.999))
    total = max(1, int(cfg.total_steps))
    warmup = int(math.ceil(float(cfg.warmup_ratio) * total))
    return opt, get_linear_schedule_with_warmup(opt, warmup, total)


def steps_per_stage(n_examples: int, cfg) -> int:
    per_epoch = math.ceil(n_examples / (int(cfg.batch_size) * int(cfg.grad_accum)))
    steps = per_epoch * int(cfg.epochs)
    if cfg.get("max_steps"):
        steps = min(steps, int(cfg.max_steps))
    return max(1, steps)


def step_gradients(
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    regularizer: Regularizer,
    ctx: StageContext,
    *,
    autocast: bool = False,
    where: str = "",
) -> dict[str, float]:
    """Forward and backward of one optimizer step over its micro-batches, then the regularizer's
    after_backward hook. Leaves the step's gradient in .grad; returns the logged terms.

    The LM loss is normalised by the trained tokens of all micro-batches together; regularizer
    terms are averaged over the micro-batches (regularizers/base.py states the rule).
    Raises TrainingError on a non-finite loss or out of memory.
    """
    n_items = sum(trained_tokens(b) for b in micro_batches)
    accum = len(micro_batches)
    device = micro_batches[0]["input_ids"].device
    logged: dict[str, float] = {}
    for micro in micro_batches:
        batch = {**micro, "num_items_in_batch": n_items}
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                lm = model(**batch).loss  # Σ over this micro-batch's trained tokens / n_items
                extra = regularizer.loss(model, batch, ctx)
                loss = lm + sum(v / accum for v in extra.values()) if extra else lm
            if not torch.isfinite(loss):
                bad = {"lm": float(lm.detach()), **{k: float(v.detach()) for k, v in extra.items()}}
                raise TrainingError(
                    f"non-finite loss at {where}: {bad}; lower trainer.lr or check the regularizer"
                )
            loss.backward()
        except torch.OutOfMemoryError:
            raise TrainingError(
                f"out of memory at {where} (micro-batch {micro['input_ids'].shape[0]} x "
                f"{micro['input_ids'].shape[1]} tokens); lower trainer.batch_size (raise trainer.grad_accum "
                "to keep the effective batch) or trainer.max_len"
            ) from None
        logged["lm"] = logged.get("lm", 0.0) + float(lm.detach())
        for k, v in extra.items():
            logged[k] = logged.get(k, 0.0) + float(v.detach()) / accum
    regularizer.after_backward(model, ctx)
    return logged


def train_stage(
    model: torch.nn.Module,
    ctx: StageContext,
    encoder: TrainingEncoder,
    cfg: Any,
    regularizer: Regularizer,
    *,
    state: TrainState | None = None,
    optimizer_state: dict | None = None,
    checkpoint: Callable[[TrainState, torch.optim.Optimizer, Any], None] | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train the trainable (LoRA) parameters on ctx.current; returns a summary for results.json.

    `cfg` needs lr, weight_decay, warmup_ratio, epochs, batch_size, grad_accum, max_grad_norm,
    total_steps (filled by the runner), checkpoint_every_steps, autocast (bf16 on CUDA).
    """
    task, device = ctx.current, ctx.device
    state = state or TrainState()
    opt, sched = build_optimizer(model, cfg)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state["optimizer"])
        sched.load_state_dict(optimizer_state["scheduler"])
    total = int(cfg.total_steps)
    bs, accum = int(cfg.batch_size), int(cfg.grad_accum)
    # The whole example order is a pure function of the seed: resuming at step k needs only k.
    order = encoder.order(task, ctx.seed, epochs=math.ceil(total * bs * accum / len(task.train)) + 1)
    params = list(trainable_parameters(model).values())
    use_autocast = device.type == "cuda" and bool(cfg.get("autocast_bf16", True)) and torch.cuda.is_bf16_supported()
    every = int(cfg.get("checkpoint_every_steps") or 0)

    def micro_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        pos = (step * accum + micro) * bs
        items = [(task, i) for i in order[pos:pos + bs]]
        items += _checked_extra(regularizer.extra_examples(ctx, step, micro), ctx)
        return encoder.batch_items(items, device)

    model.train()
    start = time.time()
    bar = tqdm(total=total, initial=state.step, desc=f"train {task.name}", leave=False, disable=not progress)
    while state.step < total:
        micro_batches = [micro_batch(state.step, m) for m in range(accum)]
        terms = step_gradients(model, micro_batches, regularizer, ctx, autocast=use_autocast,
                               where=f"task {task.name!r} step {state.step + 1} (trainer.lr={cfg.lr})")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float(cfg.max_grad_norm))
        lr = sched.get_last_lr()[0]  # the rate this step uses
        opt.step()
        regularizer.after_step(model, ctx)
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        state.losses.append({**terms, "grad_norm": float(grad_norm), "lr": lr})
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()})
        if checkpoint is not None and every and state.step % every == 0 and state.step < total:
            checkpoint(state, opt, sched)
        if on_step is not None:
            on_step(state.step, state.losses[-1])
    bar.close()
    model.eval()
    first = state.losses[0] if state.losses else {}
    last = state.losses[-1] if state.losses else {}
    return {
        "steps": total,
        "examples": len(task.train),
        "loss_first": first,
        "loss_last": last,
        "loss_curve": [round(x["lm"], 5) for x in state.losses],
        "seconds": time.time() - start,
    }


def _checked_extra(items: list[tuple[TaskData, int]], ctx: StageContext) -> list[tuple[TaskData, int]]:
    """Extra examples must be training examples of this run's tasks (never evaluation ones)."""
    for task, i in items:
        if not any(task is t for t in ctx.tasks) or not 0 <= int(i) < len(task.train):
            raise ValueError(f"extra_examples returned ({getattr(task, 'name', task)!r}, {i}): "
                             "not a training example of this run's tasks")
    return items

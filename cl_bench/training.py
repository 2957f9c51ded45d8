"""One stage's training loop.

Hand-written rather than HF Trainer because the runner needs, per step, the regularizer's
named loss terms, a NaN/inf guard that stops the stage cleanly, and in-stage checkpoints
whose data position and RNG states resume bit-identically on CPU.
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
from .tasks.base import TaskData


@dataclass
class TrainState:
    """Everything a resumed stage needs besides the model's frozen weights."""

    step: int = 0
    losses: list[dict[str, float]] = field(default_factory=list)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def build_optimizer(model, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    params = list(trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay), betas=(0.9, 0.999))
    total = max(1, int(cfg.total_steps))
    warmup = int(math.ceil(float(cfg.warmup_ratio) * total))

    def schedule(step: int) -> float:  # linear warmup then linear decay (HF Trainer's default)
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def steps_per_stage(n_examples: int, cfg) -> int:
    per_epoch = math.ceil(n_examples / (int(cfg.batch_size) * int(cfg.grad_accum)))
    steps = per_epoch * int(cfg.epochs)
    if cfg.get("max_steps"):
        steps = min(steps, int(cfg.max_steps))
    return max(1, steps)


def train_stage(
    model: torch.nn.Module,
    task: TaskData,
    encoder: TrainingEncoder,
    cfg: Any,
    regularizer: Regularizer,
    *,
    device: torch.device,
    seed: int,
    state: TrainState | None = None,
    optimizer_state: dict | None = None,
    checkpoint: Callable[[TrainState, torch.optim.Optimizer, Any], None] | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the trainable (LoRA) parameters on `task`; returns a summary for results.json.

    `cfg` needs lr, weight_decay, warmup_ratio, epochs, batch_size, grad_accum, max_grad_norm,
    total_steps (filled by the runner), checkpoint_every_steps, autocast (bf16 on CUDA).
    """
    state = state or TrainState()
    opt, sched = build_optimizer(model, cfg)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state["optimizer"])
        sched.load_state_dict(optimizer_state["scheduler"])
    total = int(cfg.total_steps)
    bs, accum = int(cfg.batch_size), int(cfg.grad_accum)
    # The whole example order is a pure function of the seed: resuming at step k needs only k.
    order = encoder.order(task, seed, epochs=math.ceil(total * bs * accum / len(task.train)) + 1)
    params = list(trainable_parameters(model).values())
    use_autocast = device.type == "cuda" and bool(cfg.get("autocast_bf16", True)) and torch.cuda.is_bf16_supported()
    every = int(cfg.get("checkpoint_every_steps") or 0)
    model.train()
    start = time.time()
    bar = tqdm(total=total, initial=state.step, desc=f"train {task.name}", leave=False, disable=not progress)
    while state.step < total:
        terms_sum: dict[str, float] = {}
        for micro in range(accum):
            pos = (state.step * accum + micro) * bs
            batch = encoder.batch(task, order[pos:pos + bs], device)
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                    lm_loss = model(**batch).loss
                    terms = {"lm": lm_loss, **regularizer.loss(model, batch)}
                    loss = sum(terms.values())
                if not torch.isfinite(loss):
                    bad = {k: float(v.detach()) for k, v in terms.items()}
                    raise TrainingError(
                        f"non-finite loss at stage task {task.name!r} step {state.step + 1}: {bad}; "
                        f"lower trainer.lr (now {cfg.lr}) or check the regularizer"
                    )
                (loss / accum).backward()
            except torch.OutOfMemoryError:
                raise TrainingError(
                    f"out of memory training {task.name!r} (batch {bs} x {batch['input_ids'].shape[1]} tokens); "
                    "lower trainer.batch_size (raise trainer.grad_accum to keep the effective batch) or trainer.max_len"
                ) from None
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float(cfg.max_grad_norm))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        state.losses.append({**terms_sum, "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0]})
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in terms_sum.items()})
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

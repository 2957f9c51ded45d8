"""The regularizer seam: stage hooks, named loss terms, a gradient hook and a data hook.

Who calls what, when (the full stage order is in cl_bench/stage.py):
  begin_stage(model, ctx)         after the adapter is initialised, before the first step
  extra_examples(ctx, step, micro) while each micro-batch is built (replay)
  loss(model, batch, ctx)         after each micro-batch's forward, before its backward
  after_backward(model, ctx)      once per optimizer step, after the backward of its last
                                  micro-batch, before gradient clipping and the optimizer step
                                  (gradient projection: GPM); .grad of the trainable params holds
                                  the step's full gradient
  after_step(model, ctx)          once per optimizer step, right after optimizer.step() and before
                                  the in-stage checkpoint (constraints on the parameters
                                  themselves: GPM keeps the step off its memory under AdamW)
  end_stage(model, ctx)           after the last step, before the merge (Fisher, input covariance)
  state_dict / load_state_dict    saved after every stage and in every in-stage checkpoint
(after_backward and after_step are hooks of the shared Plugin base, cl_bench/stage.py: the loop
calls them for initializer, regularizer and merge alike.)

Normalisation of loss terms (exact under any gradient accumulation). An optimizer step is
`ctx.grad_accum` forward passes (micro-batches). The LM loss of a micro-batch is the sum of its
trained-token losses divided by the number of trained tokens in the WHOLE step, so any split of
the same examples into micro-batches gives the same gradient. Each term returned by `loss` is
added to the micro-batch's loss divided by `ctx.grad_accum` (its gradient is the average over
the step's micro-batches) and logged as that average. (trainer.layout=group may run a step in
more or fewer forward passes than trainer.grad_accum, each padded only to its own longest
example; the ctx that `loss` receives then says how many, so the rules below stay exact.) Hence:
  * a term that does not depend on the batch (a penalty on the parameters: O-LoRA, EWC,
    PS-LoRA) is returned as is and counts exactly once per step;
  * a per-token term must be `Σ_{trained tokens of this micro-batch} ℓ · ctx.grad_accum /
    batch["num_items_in_batch"]` (`token_mean_term` computes it): summed over the step it is the
    mean over the step's trained tokens, like the LM loss.
`batch["num_items_in_batch"]` is the count of trained (label != -100, after the causal
shift) tokens in the whole step (over all ranks under distributed=ddp); `batch` also holds input_ids, attention_mask and labels
(trainer.layout=pack, which only regularizers without `loss` terms may use, sends position_ids
instead of attention_mask).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from ..lora.layers import lora_layers
from ..stage import (  # noqa: F401  (Regularizer: the seam, re-exported for regularizer=none's _target_)
    Plugin,
    Regularizer,
    StageContext,
)


def token_mean_term(token_sum: torch.Tensor, batch: dict[str, torch.Tensor], ctx: StageContext) -> torch.Tensor:
    """A per-token term of this micro-batch, normalised like the LM loss (see the module doc).

    Data parallel (distributed=ddp): num_items_in_batch counts the whole step over all ranks and
    DDP averages the ranks' gradients, so the term is multiplied by the world size, as the LM loss
    is (a parameter penalty, the same on every rank, needs nothing)."""
    world = ctx.dist.world if ctx.dist is not None else 1
    return token_sum * ctx.grad_accum * world / batch["num_items_in_batch"]


def fp32_penalty(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """fn(*tensors) in float32 outside autocast, its intermediates recomputed in backward
    (activation checkpointing) instead of kept until the step's backward: a penalty over full
    [d_out, d_in] matrices then holds one module's intermediates at a time, not all modules'."""

    def run(*args: torch.Tensor) -> torch.Tensor:
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(*(a.float() for a in args))

    if not any(t.requires_grad for t in tensors):
        return run(*tensors)
    return checkpoint(run, *tensors, use_reentrant=False)


class StageDelta:
    """ΔW_t of this stage's adapter, per module: s·(B·A − B0·A0) [d_out, d_in], differentiable
    in (A, B) — what the stage has added to the weights so far.

    (A0, B0) is the adapter as begin_stage finds it. An absorbed init left W − s·B0·A0 behind,
    so ΔW_t is then exactly StageRecord.task_vector's τ_t; inits that absorb nothing start
    with B0 = 0. ΔW_t = 0 before the first step. Build it in begin_stage; module names are
    the unwrapped model's (as in ctx.history).
    """

    def __init__(self, model: torch.nn.Module, ctx: StageContext):
        self.adapter = ctx.adapter
        self.layers = lora_layers(model, ctx.adapter)
        self.init: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, layer in self.layers.items():
            A0, B0 = layer.lora_A[self.adapter].weight.detach(), layer.lora_B[self.adapter].weight.detach()
            if bool(B0.any()):  # B0 = 0 (vanilla, EVA): nothing to subtract
                self.init[name] = (A0.float().clone(), B0.float().clone())

    @property
    def modules(self) -> list[str]:
        return list(self.layers)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The live (A, B) parameters of module `name`."""
        layer = self.layers[name]
        return layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight

    def scaling(self, name: str) -> float:
        return float(self.layers[name].scaling[self.adapter])

    def of(self, name: str, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """ΔW_t of module `name` from its factors A [r, d_in], B [d_out, r] (float32)."""
        s = self.scaling(name)
        if name not in self.init:
            return s * (B.float() @ A.float())
        A0, B0 = self.init[name]
        # two products, not one of rank 2r: at the stage start they are bitwise equal, so ΔW_t = 0 exactly
        return s * (B.float() @ A.float() - B0.to(B.device) @ A0.to(A.device))

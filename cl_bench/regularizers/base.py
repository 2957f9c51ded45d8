"""The regularizer seam: stage hooks, named loss terms, a gradient hook and a data hook.

Who calls what, when (the full stage order is in cl_bench/stage.py):
  begin_stage(model, ctx)         after the adapter is initialised, before the first step
  extra_examples(ctx, step, micro) while each micro-batch is built (replay)
  loss(model, batch, ctx)         after each micro-batch's forward, before its backward
  after_backward(model, ctx)      once per optimizer step, after the backward of its last
                                  micro-batch, before gradient clipping and the optimizer step
                                  (gradient projection: GPM); .grad of the trainable params holds
                                  the step's full gradient
  end_stage(model, ctx)           after the last step, before the merge (Fisher, input covariance)
  state_dict / load_state_dict    saved after every stage and in every in-stage checkpoint

Normalisation of loss terms (issue: exact gradient accumulation). An optimizer step is
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

import torch

from ..stage import Plugin, StageContext
from ..tasks.base import TaskData


def token_mean_term(token_sum: torch.Tensor, batch: dict[str, torch.Tensor], ctx: StageContext) -> torch.Tensor:
    """A per-token term of this micro-batch, normalised like the LM loss (see the module doc).

    Data parallel (distributed=ddp): num_items_in_batch counts the whole step over all ranks and
    DDP averages the ranks' gradients, so the term is multiplied by the world size, as the LM loss
    is (a parameter penalty, the same on every rank, needs nothing)."""
    world = ctx.dist.world if ctx.dist is not None else 1
    return token_sum * ctx.grad_accum * world / batch["num_items_in_batch"]


class Regularizer(Plugin):
    """No regularization. Subclasses override the hooks they need."""

    name = "none"

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        """Extra loss terms for this micro-batch, by name; each is logged and added to the loss."""
        return {}

    def after_backward(self, model: torch.nn.Module, ctx: StageContext) -> None:
        """Edit the accumulated gradients (p.grad of the trainable parameters) in place."""
        return None

    def extra_examples(self, ctx: StageContext, step: int, micro: int) -> list[tuple[TaskData, int]]:
        """Training examples to add to micro-batch `micro` of optimizer step `step` (0-based), as
        (task, index into task.train) with task one of ctx.tasks: evaluation examples cannot be
        named. Must be a pure function of (state, ctx.seed, step, micro) so a resumed stage
        draws the same examples."""
        return []

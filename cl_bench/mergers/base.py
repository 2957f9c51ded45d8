"""The merge seam: after stage t's training, decide the model stage t+1 trains on and the model
that is evaluated (they may differ, and either may stay PEFT-wrapped).

A merge is a thin plug-in over pure tensor functions (cl_bench/merges.py). At `consolidate`,
ctx.history already holds stage t, so the task vectors τ_1..τ_t are
`ctx.history.task_vectors(module)` (exactly recomputed from the stage files, also after resume).
Weights change only through the one fold, `ctx.master.fold_(name, layer, Δ)` (lora.py), which
keeps float32 masters of low-precision weights. Everything the merge needs beyond the history
to rebuild its models on resume goes into `state_dict()`; `restore` rebuilds them.
"""
from __future__ import annotations

import torch

from ..stage import Models, Plugin, StageContext


class Merge(Plugin):
    name = "merge"

    def consolidate(self, model: torch.nn.Module, ctx: StageContext) -> Models:
        """Called once per stage with the trained PEFT model (adapter ctx.adapter), after
        end_stage and after stage t joined ctx.history. Returns the train and eval models."""
        raise NotImplementedError

    def restore(self, model: torch.nn.Module, ctx: StageContext) -> Models:
        """On resume after stage ctx.stage: `model` is a fresh model whose target weights hold
        the saved train model's (model_state), ctx.history holds stages 1..ctx.stage, and this
        plug-in's state is loaded. Default: that model both trains and is evaluated."""
        return Models(train=model, eval=model)

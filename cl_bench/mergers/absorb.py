"""Absorb: W_t = W_{t-1} + s·B_t·A_t; the adapter is folded into the base weights and removed.

Models(train, eval) after stage t: both W0 + Σ_{i≤t} τ_i (one model: the model evaluated after
stage t is the model stage t+1 trains on).
"""

from __future__ import annotations

import torch

from ..lora import task_vectors as merges
from ..lora.layers import fold_adapter_
from ..stage import Models, StageContext
from .base import Merge


class Absorb(Merge):
    name = "absorb"
    sharded_weights = True  # one fold per module

    @torch.no_grad()
    def consolidate(self, model: torch.nn.Module, ctx: StageContext) -> Models:
        fold_adapter_(model, ctx.adapter, ctx.master)
        plain = model.unload()
        return Models(train=plain, eval=plain)

    def eval_delta(self, history, module, device=None) -> torch.Tensor:
        return merges.task_sum([r.task_vector(module).to(device) for r in history])

    def train_delta(self, history, module, device=None) -> torch.Tensor:
        return self.eval_delta(history, module, device)

"""Absorb: W_t = W_{t-1} + s·B_t·A_t; the adapter is folded into the base weights and removed.

The model evaluated after stage t is the model stage t+1 trains on.
"""
from __future__ import annotations

import torch

from ..lora import fold_adapter_
from ..stage import Models, StageContext
from .base import Merge


class Absorb(Merge):
    name = "absorb"

    @torch.no_grad()
    def consolidate(self, model: torch.nn.Module, ctx: StageContext) -> Models:
        fold_adapter_(model, ctx.adapter, ctx.master)
        plain = model.unload()
        return Models(train=plain, eval=plain)

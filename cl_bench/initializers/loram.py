"""LoRAM: data-free deterministic DST-I bases with the variance-matched magnitude rescale.

A = first r rows of the orthonormal d_in×d_in DST-I matrix, B = first r columns of the
d_out×d_out one, both scaled by β = (η_r·η_var)^(1/4) against the current W, then absorbed
(W ← W − s·B·A) by the runner's lora.apply_init. The subspace is the same at every stage; only
the magnitude follows the (merged) weights.
"""

from __future__ import annotations

import time

import torch

from ..infra.errors import ConfigError
from ..lora import linalg
from ..lora.layers import as_out_in, base_weight, full_weight, lora_layers, module_shapes, validate_rank
from ..stage import StageContext
from .base import Initializer, InitResult, peak_memory_mb, reset_peak_memory


class LoRAM(Initializer):
    name = "loram"

    def validate(self, module_shapes: dict[str, tuple[int, int]], rank: int) -> None:
        if rank < 2:
            raise ConfigError(f"lora.r={rank}: loram rescales by η_r = log_m r, which is 0 at r = 1; use lora.r >= 2")
        validate_rank(module_shapes, rank, list(module_shapes))

    @torch.no_grad()
    def init(self, peft_model: torch.nn.Module, ctx: StageContext) -> InitResult:
        start = time.perf_counter()
        reset_peak_memory(ctx.device)
        layers = lora_layers(peft_model, ctx.adapter)
        self.validate(module_shapes(layers), ctx.rank)
        factors, betas = {}, []
        for name, layer in layers.items():
            W = as_out_in(layer, full_weight(base_weight(layer)))  # gathered when sharded (fsdp)
            A, B = linalg.dst1_factors(W.shape[0], W.shape[1], int(layer.r[ctx.adapter]), device=W.device)
            A, B, beta = linalg.rescale_factors(W, A, B)
            factors[name] = (A, B)
            betas.append(beta)
        stats = {
            "method": self.name,
            "rank": ctx.rank,
            "beta": {"min": min(betas), "mean": sum(betas) / len(betas), "max": max(betas)},
            "seconds": {"total": time.perf_counter() - start},
            "peak_memory_mb": peak_memory_mb(ctx.device),
        }
        return InitResult(factors=factors, absorb=True, stats=stats)

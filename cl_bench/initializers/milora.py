"""MiLoRA: adapt the minor singular components of each weight (Wang et al. 2024).

W = U Σ Vᵀ; the adapter starts as the r smallest components, split as
A = sqrt(σ/s)·V_minᵀ, B = U_min·sqrt(σ/s) so that s·B·A is exactly that minor part, and the
base weight keeps the principal part after absorption (W ← W − s·B·A). PEFT has no MiLoRA,
so this is the one SVD-of-W init written by hand; it uses the exact SVD (a randomized one
finds the leading, not the trailing, components).
"""

from __future__ import annotations

import time

import torch

from ..lora import linalg
from ..lora.layers import as_out_in, base_weight, full_weight, lora_layers, module_shapes, validate_rank
from ..stage import StageContext
from .base import Initializer, InitResult, peak_memory_mb, reset_peak_memory


class MiLoRA(Initializer):
    name = "milora"

    def validate(self, module_shapes: dict[str, tuple[int, int]], rank: int) -> None:
        validate_rank(module_shapes, rank, list(module_shapes))

    @torch.no_grad()
    def init(self, peft_model: torch.nn.Module, ctx: StageContext) -> InitResult:
        start = time.perf_counter()
        reset_peak_memory(ctx.device)
        layers = lora_layers(peft_model, ctx.adapter)
        self.validate(module_shapes(layers), ctx.rank)
        factors, minor_sq, total_sq = {}, 0.0, 0.0
        for name, layer in layers.items():
            W = as_out_in(layer, full_weight(base_weight(layer)))  # gathered when sharded (fsdp)
            s = float(layer.scaling[ctx.adapter])
            A, B = linalg.minor_component_factors(W, int(layer.r[ctx.adapter]), s)
            factors[name] = (A, B)
            sigma = s * A.double().pow(2).sum(1)  # row i of A has squared norm σ_i / s
            minor_sq += float(sigma.pow(2).sum())
            total_sq += float(W.double().pow(2).sum())
        stats = {
            "method": self.name,
            "rank": ctx.rank,
            "minor_energy_fraction": minor_sq / total_sq if total_sq > 0 else 0.0,
            "seconds": {"total": time.perf_counter() - start},
            "peak_memory_mb": peak_memory_mb(ctx.device),
        }
        return InitResult(factors=factors, absorb=True, stats=stats)

"""Merging a trained stage into the model the next stage starts from.

Pure tensor functions plus one small class per merge strategy (chosen by `_target_` in
conf/merge/*.yaml). Merging is done here, not with PEFT's merge_and_unload, so that a resumed
run replays exactly the same arithmetic as an uninterrupted one.
"""
from __future__ import annotations

import torch


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s·B·A in fp32."""
    return scaling * (B.float() @ A.float())


def add_delta_(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """W ← W + Δ, computed in fp32 and cast back to W's dtype."""
    weight.copy_((weight.float() + delta).to(weight.dtype))


def lora_layers(peft_model, adapter: str = "default"):
    """(module name, LoRA layer) for every layer that holds `adapter`."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
            yield name, module


class Absorb:
    """W_t = W_{t-1} + s·B_t·A_t: each stage's adapter is folded into the base weights."""

    name = "absorb"

    @torch.no_grad()
    def merge(self, peft_model, adapter: str = "default") -> tuple[torch.nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Fold the adapter into the base weights and unwrap. Returns (plain model, trained factors)."""
        factors = {}
        for name, layer in lora_layers(peft_model, adapter):
            A = layer.lora_A[adapter].weight.detach()
            B = layer.lora_B[adapter].weight.detach()
            add_delta_(layer.base_layer.weight, lora_delta(A, B, layer.scaling[adapter]))
            factors[name] = (A.cpu().clone(), B.cpu().clone())
        return peft_model.unload(), factors

"""Copy initializer factors into a PEFT adapter and absorb them into the base weight.

Absorption: W ← W − s·B·A with s = the module's actual `scaling[adapter]` (rsLoRA α/√r or
standard α/r, whichever PEFT was configured with), computed in float32 from the factors *as
stored in the adapter* (after any dtype cast), then cast back to W's dtype. The adapted
function W + s·B·A is then the original W up to that final cast.
"""
from __future__ import annotations

import math
import resource

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from .. import merges
from ..errors import ConfigError
from .base import InitResult


def lora_layers(peft_model: torch.nn.Module, adapter_name: str = "default") -> dict[str, LoraLinear]:
    """LoRA Linear layers carrying `adapter_name`, by their name in peft_model.named_modules()."""
    layers: dict[str, LoraLinear] = {}
    for name, module in merges.lora_layers(peft_model, adapter_name):
        if not isinstance(module, LoraLinear):
            raise ConfigError(
                f"lora.target_modules: {name} is a {type(module).__name__}; "
                "data-driven initializers support Linear targets only"
            )
        layers[name] = module
    if not layers:
        raise ConfigError(f"no LoRA layers with adapter {adapter_name!r} found; check lora.target_modules")
    return layers


def base_weight(layer: LoraLinear) -> torch.Tensor:
    """The frozen base weight of a LoRA layer (the Parameter itself, possibly [d_in, d_out])."""
    return layer.get_base_layer().weight


def as_out_in(layer: LoraLinear, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor in [d_out, d_in] layout (GPT-2 Conv1D stores it transposed)."""
    return tensor.T if layer.fan_in_fan_out else tensor


def module_shapes(layers: dict[str, LoraLinear]) -> dict[str, tuple[int, int]]:
    return {name: (layer.out_features, layer.in_features) for name, layer in layers.items()}


@torch.no_grad()
def apply_init(peft_model: torch.nn.Module, result: InitResult, adapter_name: str = "default") -> dict:
    """Write `result.factors` into the adapter and, if `result.absorb`, subtract s·B·A from W.

    Returns a small JSON summary (modules written, whether absorbed, ‖s·B·A‖_F over all modules).
    """
    if result.factors is None:
        return {"modules": 0, "absorbed": False, "factors": "peft"}
    layers = lora_layers(peft_model, adapter_name)
    unknown = sorted(set(result.factors) - set(layers))
    if unknown:
        raise ValueError(f"initializer returned factors for modules without adapter {adapter_name!r}: {unknown[:3]}")
    delta_sq = 0.0
    for name, (A, B) in result.factors.items():
        layer = layers[name]
        lora_A = layer.lora_A[adapter_name].weight
        lora_B = layer.lora_B[adapter_name].weight
        if tuple(A.shape) != tuple(lora_A.shape) or tuple(B.shape) != tuple(lora_B.shape):
            raise ValueError(
                f"{name}: factor shapes A{tuple(A.shape)} B{tuple(B.shape)} do not match the adapter "
                f"A{tuple(lora_A.shape)} B{tuple(lora_B.shape)}"
            )
        lora_A.copy_(A)
        lora_B.copy_(B)
        if result.absorb:
            weight = base_weight(layer)
            s = float(layer.scaling[adapter_name])
            delta = s * (lora_B.float() @ lora_A.float()).to(weight.device)
            delta_sq += float(delta.double().pow(2).sum())
            absorbed = weight.float() - as_out_in(layer, delta)
            weight.copy_(absorbed.to(weight.dtype))
    return {"modules": len(result.factors), "absorbed": bool(result.absorb), "delta_fro": math.sqrt(delta_sq)}


def reset_peak_memory(device: torch.device) -> None:
    """Start a CUDA peak-memory window for the init's stats (no-op on CPU)."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> dict:
    """Peak memory for results.json: CUDA peak since reset_peak_memory (when on CUDA) and the
    process's lifetime peak RSS (the only CPU measure the OS gives without sampling)."""
    out = {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda" and torch.cuda.is_available():
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out

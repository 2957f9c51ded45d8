"""The initializer seam: how each stage's fresh LoRA adapter starts.

The runner, per stage (cl_bench/stage.py has the whole order):
  1. kwargs = init.lora_config_kwargs()                 # e.g. init_lora_weights="pissa"
  2. lora_config = LoraConfig(..., **kwargs)
     init.before_wrap(model, lora_config, ctx)          # e.g. PEFT's LoRA-GA / CorDA preprocessing
  3. peft_model = wrap(model, lora_config, ctx.adapter)
  4. result = init.init(peft_model, ctx)                # (A0, B0) per module + stats
  5. the runner sets every layer's s from stage.lora_scaling, then lora.apply_init copies
     result.factors into the adapter and, if result.absorb, folds W ← W − s·B0·A0, so the
     model's function is unchanged at t = 0. An initializer whose absorption PEFT already did
     (factors None, absorb True) only has the fp32 master brought along.
  6. begin_stage / end_stage / state_dict as for every plug-in (stage.Plugin).
Initializers never import each other or the runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..infra import memory
from ..lora.layers import Factors
from ..stage import Plugin, StageContext


@dataclass
class InitResult:
    # module name (as in lora.lora_layers: the unwrapped model's) -> (A [r, d_in], B [d_out, r]).
    # None keeps whatever PEFT initialised.
    factors: Factors | None = None
    # W ← W − s·B0·A0 happened (PEFT) or must happen (runner, when factors are given).
    absorb: bool = False
    stats: dict[str, Any] = field(default_factory=dict)  # goes to results.json stages[i].init


class Initializer(Plugin):
    """Default: PEFT's own init (vanilla LoRA: Kaiming A, B = 0)."""

    name = "vanilla"
    sharded_weights = True  # PEFT's default init writes only the adapter

    def lora_config_kwargs(self) -> dict[str, Any]:
        return {}

    def before_wrap(self, model: torch.nn.Module, lora_config: Any, ctx: StageContext) -> None:
        return None

    def validate(self, module_shapes: dict[str, tuple[int, int]], rank: int) -> None:
        """Raise ConfigError before any work if this method cannot run on these shapes."""
        return None

    def init(self, peft_model: torch.nn.Module, ctx: StageContext) -> InitResult:
        return InitResult(stats={"method": self.name})


def reset_peak_memory(device: torch.device) -> None:
    """Start the init's peak-memory window (CUDA peak counter; the RSS high-water mark on Linux)."""
    memory.reset_peak(device)


def peak_memory_mb(device: torch.device) -> dict:
    """Peak memory for results.json since reset_peak_memory: CUDA max allocated (on CUDA) and the
    process's peak RSS (memory.peak_mb says whether it is since the reset or process-lifetime)."""
    peak = memory.peak_mb(device)
    out = {"process_peak_rss_mb": peak["rss_peak_mb"], "rss_scope": peak["rss_peak_scope"]}
    if "cuda_max_allocated_mb" in peak:
        out["cuda_peak_allocated_mb"] = peak["cuda_max_allocated_mb"]
    return out

"""The collectives around a stage's init, by name, so that the stage order in run/runner.py does
not read as rank logic. Both are no-ops for one process (they belong with infra/distributed.Dist).
"""

from __future__ import annotations

from ..infra.distributed import Dist
from ..lora.layers import Factors, WeightMaster, base_weight, lora_layers


def _adapter_tensors(peft_model, adapter: str) -> list:
    return [
        t
        for layer in lora_layers(peft_model, adapter).values()
        for t in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
    ]


def share_init_factors(dist: Dist, factors: Factors | None, peft_model, adapter: str) -> None:
    """distributed=fsdp, before the init is applied: every rank folds its own rows of W, so all
    must fold rank 0's (A0, B0) and start from rank 0's adapter (tensors overwritten in place)."""
    if dist.sharded:
        dist.broadcast_(
            [t for A, B in (factors or {}).values() for t in (A, B)] + _adapter_tensors(peft_model, adapter),
            "broadcasting the stage's init",
        )


def share_started_adapter(dist: Dist, peft_model, adapter: str, master: WeightMaster) -> None:
    """distributed=ddp, after the init is applied: every rank computed it; all continue from
    rank 0's target weights, adapter and fp32 master, bit for bit."""
    if dist.world > 1 and not dist.sharded:
        layers = lora_layers(peft_model, adapter).values()
        dist.broadcast_(
            [
                t
                for layer in layers
                for t in (base_weight(layer), layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
            ]
            + list(master.tensors.values()),
            "broadcasting the stage's init",
        )

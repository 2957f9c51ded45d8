"""Merging math: pure tensor functions over LoRA deltas and per-stage task vectors (no model code).

A stage's task vector is τ_i = s·B_i·A_i − s·B0_i·A0_i (stage.StageRecord.task_vector): what
stage i added to the weights, net of any absorbed init. The merge plug-ins (cl_bench/mergers/)
decide from these which models train and are evaluated next; the fold into the weights is
lora.WeightMaster.fold_.
"""
from __future__ import annotations

import torch


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s·B·A in float32, [d_out, d_in] (A: [r, d_in], B: [d_out, r])."""
    return scaling * (B.float() @ A.float())

"""The regularizer seam: hooks around one stage's training and named extra loss terms."""
from __future__ import annotations

from typing import Any

import torch


class Regularizer:
    """No regularization. Subclasses override the hooks they need."""

    name = "none"

    def begin_stage(self, model: torch.nn.Module, stage: int, task: Any) -> None:
        """Called after the adapter is initialised, before the first optimizer step."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Extra loss terms for this batch, by name; each is logged and added to the LM loss."""
        return {}

    def end_stage(self, model: torch.nn.Module, stage: int, task: Any) -> None:
        """Called after training, before the merge (e.g. snapshot A for O-LoRA, Fisher for EWC)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that resume needs (written as safetensors)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        return None

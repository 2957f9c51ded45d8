"""Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic", §2):
W = W0 + λ·Σ_{i≤t} τ_i.

Models(train, eval) after stage t:
  train_on="sum" (default): train W0 + Σ_{i≤t} τ_i (absorb's model); eval W0 + λ·Σ_{i≤t} τ_i.
    λ = 1 is absorb exactly.
  train_on="merged": train = eval = W0 + λ·Σ_{i≤t} τ_i; each stage's τ is measured against it,
    so every stage's own delta ends up scaled by λ.
"""

from __future__ import annotations

from ..lora import task_vectors as merges
from .base import TaskVectorMerge, _number


class TaskArithmetic(TaskVectorMerge):
    name = "task_arithmetic"

    def __init__(self, lam: float = 1.0, train_on: str = "sum") -> None:
        super().__init__(train_on)
        self.lam = _number("lam", lam, lambda v: v > 0, "a number > 0 (λ)")

    def merge(self, taus, stages, module):
        return merges.task_arithmetic(taus, self.lam)

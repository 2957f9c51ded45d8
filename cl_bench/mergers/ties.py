"""TIES-Merging (Yadav et al. 2023): trim each τ_i to its top `density` fraction by magnitude,
elect a sign per entry by summed value, average the entries that agree with it, times λ
(merges.ties; PEFT's merge_utils.ties; the trim is per module).

Models(train, eval) after stage t:
  train_on="sum" (default): train W0 + Σ_{i≤t} τ_i (absorb's model); eval W0 + TIES(τ_1..τ_t).
  train_on="merged": train = eval = W0 + TIES(τ_1..τ_t); τ_{t+1} is measured against it.
"""

from __future__ import annotations

from ..lora import task_vectors as merges
from .base import TaskVectorMerge, _choice, _number


class Ties(TaskVectorMerge):
    name = "ties"

    def __init__(self, density: float = 0.2, lam: float = 1.0, sign: str = "total", train_on: str = "sum") -> None:
        super().__init__(train_on)
        self.density = _number(
            "density", density, lambda v: 0 < v <= 1, "a number in (0, 1] (fraction of entries kept)"
        )
        self.lam = _number("lam", lam, lambda v: v > 0, "a number > 0 (λ)")
        self.sign = _choice("sign", sign, merges.SIGN_METHODS)

    def merge(self, taus, stages, module):
        return merges.ties(taus, self.density, self.lam, self.sign)

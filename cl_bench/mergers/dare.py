"""DARE (Yu et al. 2024): drop each entry of τ_i with probability p, rescale the rest by
1/(1 − p), then combine — by task arithmetic (λ·Σ, PEFT's dare_linear, the default) or by TIES's
sign election and disjoint mean (PEFT's dare_ties). The drop mask of τ_i is seeded by (run
seed, stage i, module) (merges.dare_seed), so it is the same at every stage's merge, on resume
and in a remerge.

Models(train, eval) after stage t:
  train_on="sum" (default): train W0 + Σ_{i≤t} τ_i (absorb's model); eval W0 + DARE(τ_1..τ_t).
  train_on="merged": train = eval = W0 + DARE(τ_1..τ_t); τ_{t+1} is measured against it.
"""

from __future__ import annotations

from ..infra.errors import ConfigError
from ..lora import task_vectors as merges
from .base import TaskVectorMerge, _choice, _number


class Dare(TaskVectorMerge):
    name = "dare"

    def __init__(
        self,
        p: float = 0.9,
        lam: float = 1.0,
        combine: str = "task_arithmetic",
        sign: str = "total",
        seed: int = 0,
        train_on: str = "sum",
    ) -> None:
        super().__init__(train_on)
        self.p = _number("p", p, lambda v: 0 <= v < 1, "a number in [0, 1) (drop rate)")
        self.lam = _number("lam", lam, lambda v: v > 0, "a number > 0 (λ)")
        self.combine = _choice("combine", combine, merges.DARE_COMBINES)
        self.sign = _choice("sign", sign, merges.SIGN_METHODS)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"merge.seed={seed!r} is invalid; valid: an integer")
        self.seed = seed

    def merge(self, taus, stages, module):
        seeds = [merges.dare_seed(self.seed, stage, module) for stage in stages]
        return merges.dare(taus, self.p, seeds, self.lam, self.combine, self.sign)

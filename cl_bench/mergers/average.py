"""Average: W = W0 + (1/t)·Σ_{i≤t} τ_i, the weight average of the per-stage models W0 + τ_i
(PS-LoRA Table 19, "Average").

Models(train, eval) after stage t:
  train_on="sum" (default): train W0 + Σ_{i≤t} τ_i (absorb's model); eval W0 + mean_{i≤t} τ_i.
  train_on="merged": train = eval = W0 + mean_{i≤t} τ_i (stage t+1 starts from the average).
"""

from __future__ import annotations

from ..lora import task_vectors as merges
from .base import TaskVectorMerge


class Average(TaskVectorMerge):
    name = "average"

    def merge(self, taus, stages, module):
        return merges.average(taus)

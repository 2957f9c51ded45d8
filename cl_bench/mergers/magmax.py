"""PS-LoRA's merge (Algorithm 1 with Eq. 5): earlier LoRAs are kept as deltas and, for
inference, merged by elementwise magnitude maximum (merges.magmax; MagMax, Marczak et al. 2024).

Models(train, eval) after stage t, following Algorithm 1:
  train (default train_on="sum"): W0 + Σ_{i≤t} ΔW_i. Stage t+1's forward pass is
    W0·x + Σ_{i≤t} ΔW_i·x + ΔW_{t+1}·x with only ΔW_{t+1} = s·B·A trained: the earlier deltas
    enter as their sum (Eq. 3, the IncLoRA model whose ΔW_i the paper analyses and its PS loss,
    Eq. 4, compares against), folded into W — the same function at one matmul per layer. We read
    the "ΔW_[1:t−1]" of Algorithm 1's forward pass as those kept deltas: the merge is the
    post-training step ("after training, all LoRAs are merged ... for inference", Fig. 5;
    "post-training merging strategies", Table 19).
  eval: W0 + ΔW_[1:t], ΔW_[1:t] = M(ΔW_[1:t−1], ΔW_t) (Eq. 5) over ΔW_i = τ_i, rebuilt on
    resume from the per-stage factor files (the kept deltas) and the train weights.
  train_on="merged" (not the paper's): train = eval = W0 + ΔW_[1:t].
"""

from __future__ import annotations

from ..lora import task_vectors as merges
from .base import TaskVectorMerge


class MagMax(TaskVectorMerge):
    name = "magmax"

    def merge(self, taus, stages, module):
        return merges.magmax(taus)

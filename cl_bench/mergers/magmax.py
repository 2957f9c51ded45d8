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

`vectors` (merges.magmax): "per_stage" (default: PS-LoRA's Eq. 5 over the per-stage ΔW_i = τ_i,
what this merge is for) or "cumulative" (MagMax as Marczak et al., ECCV 2024, define it: each
parameter's largest-magnitude value among the cumulative task vectors θ_i − θ_0 = Σ_{j≤i} τ_j of
sequential fine-tuning). With train_on="sum", θ_i is the model sequential training reached after
stage i, exactly the paper's setting. Both are the identity on one task vector.
"""

from __future__ import annotations

from ..lora import task_vectors as merges
from .base import TaskVectorMerge, _choice


class MagMax(TaskVectorMerge):
    name = "magmax"

    def __init__(self, vectors: str = "per_stage", train_on: str = "sum") -> None:
        super().__init__(train_on)
        self.vectors = _choice("vectors", vectors, merges.MAGMAX_VECTORS)

    def merge(self, taus, stages, module):
        return merges.magmax(taus, self.vectors)

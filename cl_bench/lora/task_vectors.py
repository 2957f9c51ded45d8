"""Merging math: pure tensor functions over LoRA deltas and per-stage task vectors (no model code).

A stage's task vector is τ_i = s·B_i·A_i − s·B0_i·A0_i (stage.StageRecord.task_vector): what
stage i added to the weights, net of any absorbed init. Every merge below maps the task vectors
of one module, τ_1..τ_t (each [d_out, d_in], float32, same device), to one merged delta
[d_out, d_in]; the model it describes is W0 + merged. The merge plug-ins (cl_bench/mergers/)
decide which models train and are evaluated; the fold into the weights is lora.WeightMaster.fold_.

PEFT's merge utilities (peft.utils.merge_utils) compute task arithmetic, TIES and DARE's
pruning and combination; they are used here as they are. Hand-written: the elementwise
magnitude maximum (MagMax / PS-LoRA Eq. 5, absent from PEFT) and DARE's per-stage seeding
(PEFT draws DARE's masks from the global RNG; see `dare_prune`). peft is imported inside the
functions: importing it costs seconds, and this module is imported by every CLI run.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence

import torch

SIGN_METHODS = ("total", "frequency")  # TIES sign election (PEFT's calculate_majority_sign_mask)
DARE_COMBINES = ("task_arithmetic", "ties")  # PEFT's dare_linear / dare_ties


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s·B·A in float32, [d_out, d_in] (A: [r, d_in], B: [d_out, r])."""
    return scaling * (B.float() @ A.float())


def _check(taus: Sequence[torch.Tensor]) -> None:
    if not taus:
        raise ValueError("merging needs at least one task vector")
    shape = tuple(taus[0].shape)
    if any(tuple(t.shape) != shape for t in taus):
        raise ValueError(f"task vectors differ in shape: {[tuple(t.shape) for t in taus]}")


def _weights(taus: Sequence[torch.Tensor], value: float) -> torch.Tensor:
    return torch.full((len(taus),), float(value), dtype=taus[0].dtype, device=taus[0].device)


def task_sum(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_i τ_i, accumulated in order (one extra tensor of memory, not a [t, d_out, d_in] stack).

    The model of sequential absorption: W0 + Σ τ_i (Eq. 3 of PS-LoRA, "IncLoRA")."""
    _check(taus)
    out = taus[0].clone()
    for tau in taus[1:]:
        out += tau
    return out


def task_arithmetic(taus: Sequence[torch.Tensor], lam: float) -> torch.Tensor:
    """λ·Σ_i τ_i (Ilharco et al. 2023, "Editing models with task arithmetic", §2: θ = θ0 + λ Σ τ_i).

    PEFT's merge_utils.task_arithmetic with every weight λ."""
    from peft.utils.merge_utils import task_arithmetic as peft_task_arithmetic

    _check(taus)
    return peft_task_arithmetic(list(taus), _weights(taus, lam))


def average(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1/t)·Σ_i τ_i: the weight average of the t models W0 + τ_i (PS-LoRA Table 19, "Average").

    PEFT's task_arithmetic with every weight 1/t (exact for t = 1: τ_1 · 1.0)."""
    from peft.utils.merge_utils import task_arithmetic as peft_task_arithmetic

    _check(taus)
    return peft_task_arithmetic(list(taus), _weights(taus, 1.0 / len(taus)))


def ties(taus: Sequence[torch.Tensor], density: float, lam: float = 1.0, sign: str = "total") -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, §3 and Algorithm 1): λ · disjoint_mean.

    1. trim: each τ_i keeps its top ⌊density·numel⌋ entries by |value| (the rest → 0); the trim
       is per module (PEFT's choice; Yadav et al. trim the whole-model vector at once);
    2. elect: γ = sgn(Σ_i τ̂_i) per entry (sign="total": the sign with the larger summed
       magnitude; "frequency": the sign of more task vectors); γ = +1 where the sum is 0;
    3. disjoint merge: mean over the i with sgn(τ̂_i) = γ (entries trimmed to 0 never count;
       an entry no τ̂_i agrees on is 0), times λ.
    PEFT's merge_utils.ties with every weight λ. density in (0, 1]; density = 1 skips the trim.
    """
    from peft.utils.merge_utils import ties as peft_ties

    _check(taus)
    with warnings.catch_warnings():  # PEFT warns that density 1 prunes nothing: that is the point
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        return peft_ties(list(taus), _weights(taus, lam), float(density), majority_sign_method=sign)


def dare_seed(seed: int, stage: int, module: str) -> int:
    """The seed of DARE's drop mask for (run seed, stage, module): stable across processes
    (a hash of the three, not Python's salted hash()), so a resume or a remerge redraws it."""
    digest = hashlib.sha256(f"dare:{int(seed)}:{int(stage)}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dare_prune(tau: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """DARE's Drop And REscale of one task vector (Yu et al. 2024, Eq. 2): each entry is
    dropped with probability p, the kept ones are divided by 1 − p.

    PEFT's merge_utils.random_pruning (density = 1 − p, rescale) draws from the global RNG; here
    it runs on the CPU generator seeded with `seed` inside torch.random.fork_rng, so the mask
    depends only on (seed, shape) — not on the device, nor on what was drawn before — and the
    caller's RNG state is left as it was. Returns a tensor on tau's device. p in [0, 1).
    """
    from peft.utils.merge_utils import random_pruning

    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop rate p={p!r} must lie in [0, 1)")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        return random_pruning(tau.detach().float().cpu(), 1.0 - float(p), rescale=True).to(tau.device)


def dare(
    taus: Sequence[torch.Tensor],
    p: float,
    seeds: Sequence[int],
    lam: float = 1.0,
    combine: str = "task_arithmetic",
    sign: str = "total",
) -> torch.Tensor:
    """DARE (Yu et al. 2024, "Language models are Super Mario", §3): τ̃_i = dare_prune(τ_i, p,
    seeds[i]), then combined as PEFT combines them after its pruning:
      combine="task_arithmetic": λ·Σ_i τ̃_i (PEFT's dare_linear; the paper's DARE + Task Arithmetic);
      combine="ties": TIES's sign election and disjoint mean over the τ̃_i, times λ (PEFT's dare_ties:
      DARE's random drop replaces TIES's magnitude trim).
    One seed per task vector, so τ_i's mask is the same whichever stages are merged with it.
    """
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge
    from peft.utils.merge_utils import task_arithmetic as peft_task_arithmetic

    _check(taus)
    if len(seeds) != len(taus):
        raise ValueError(f"DARE needs one seed per task vector: {len(seeds)} seeds, {len(taus)} task vectors")
    if combine not in DARE_COMBINES:
        raise ValueError(f"DARE combine={combine!r}; valid: {', '.join(DARE_COMBINES)}")
    pruned = [dare_prune(t, p, s) for t, s in zip(taus, seeds)]
    if combine == "task_arithmetic":
        return peft_task_arithmetic(pruned, _weights(pruned, lam))
    stacked = torch.stack(pruned, dim=0)
    mask = calculate_majority_sign_mask(stacked, method=sign)
    return disjoint_merge(stacked * lam, mask)


MAGMAX_VECTORS = ("per_stage", "cumulative")


def magmax(taus: Sequence[torch.Tensor], vectors: str = "per_stage") -> torch.Tensor:
    """Elementwise magnitude maximum over task vectors, in two forms (`vectors`):

      per_stage (PS-LoRA Eq. 5): ΔW_[1:t] = M(ΔW_[1:t−1], ΔW_t) with [M(X, Y)]_ij = Y_ij if
        |Y_ij| ≥ |X_ij| else X_ij over the per-stage deltas ΔW_i = τ_i; unrolled, each entry takes
        the value of the τ_i of largest |value|.
      cumulative (MagMax, Marczak et al., ECCV 2024, §3): after sequential fine-tuning the task
        vectors are θ_i − θ_0 = Σ_{j≤i} τ_j (the model after task i minus the pre-trained one), and
        each parameter takes the value of largest magnitude among them.
    On equal magnitudes the later one wins (the ≥ of Eq. 5). Hand-written: PEFT has no
    magnitude-max merge (its magnitude_prune trims, it does not select across task vectors).
    Raises ValueError for an unknown `vectors`.
    """
    _check(taus)
    if vectors not in MAGMAX_VECTORS:
        raise ValueError(f"vectors={vectors!r}; valid: {', '.join(MAGMAX_VECTORS)}")
    candidates = taus
    if vectors == "cumulative":
        running, candidates = taus[0].clone(), []
        for i, tau in enumerate(taus):
            running = running if i == 0 else running + tau
            candidates.append(running)
    merged = candidates[0].clone()
    for vector in candidates[1:]:
        merged = torch.where(vector.abs() >= merged.abs(), vector, merged)
    return merged

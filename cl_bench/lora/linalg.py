"""Pure tensor math of the data-driven LoRA initializers (no model code, no global state).

* ψ operators reconciling the current-task gradient g with the previous-tasks gradient h
  (SLICE, Eq. 6 generalised): pcgrad, gradvac, nullspace, magnitude_preserving, each damped
  by c ∈ [0, 1] (c = 0 returns g unchanged) and gated by a cosine threshold τ.
  `scope="global"` computes one coefficient for all modules from per-module inner products,
  which equals the operator applied to the concatenation of all modules, without building it.
* LoRA-GA subspace selection from a (randomized, seeded) SVD: B = U[:, :r], A = V[:, r:2r]ᵀ.
* Variance-matched magnitude rescale β = (η_r·η_var)^(1/4), η_r = log_m r (LoRAM / SLICE Eq. 9),
  or LoRA-GA's original stable scale ζ = d_out^(1/4)/√γ on both factors.
* Deterministic DST-I bases (LoRAM) and minor-singular-component factors (MiLoRA).

Conventions: a module's gradient/weight is [d_out, d_in]; A is [r, d_in], B is [d_out, r];
inner products and norms are accumulated in float64; everything else runs in float32.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

OPERATORS = ("pcgrad", "gradvac", "nullspace", "magnitude_preserving")
# Operators with a well-defined single coefficient over the concatenated gradient.
GLOBAL_OPERATORS = ("pcgrad", "magnitude_preserving")
SCOPES = ("global", "per_module")
SVD_METHODS = ("randomized", "exact")


# --------------------------------------------------------------------------- inner products
def inner_products(g: torch.Tensor, h: torch.Tensor) -> tuple[float, float, float]:
    """(⟨g,h⟩_F, ‖g‖², ‖h‖²) in float64, one module at a time (bounded extra memory)."""
    g64, h64 = g.detach().double().reshape(-1), h.detach().double().reshape(-1)
    return float(g64 @ h64), float(g64 @ g64), float(h64 @ h64)


def cosine(dot: float, g_sq: float, h_sq: float) -> float:
    """cos(g, h); 0 when either vector is zero (nothing to reconcile)."""
    if g_sq <= 0.0 or h_sq <= 0.0:
        return 0.0
    return dot / math.sqrt(g_sq * h_sq)


def pcgrad_gamma(dot: float, g_sq: float, h_sq: float, threshold: float = 0.0) -> tuple[float, float, bool]:
    """(γ, cos, fired) with ψ = g + c·γ·h.

    Fires iff cos(g, h) < threshold; then γ = −⟨g,h⟩/‖h‖² removes the component of g along h.
    With threshold 0 this is exactly SLICE Eq. 6: g − c·min(⟨g,h⟩, 0)/‖h‖²·h.
    """
    cos = cosine(dot, g_sq, h_sq)
    fired = h_sq > 0.0 and cos < threshold
    return (-dot / h_sq if fired else 0.0), cos, fired


def gradvac_lambda(dot: float, g_sq: float, h_sq: float, target: float) -> tuple[float, float, bool]:
    """(λ, cos, fired) of GradVac (Wang et al. 2021) with ψ = g + c·λ·h.

    Fires iff cos(g, h) < target φ; λ raises the cosine of g + λh with h to exactly φ.
    At φ = 0 this reduces to PCGrad's γ.
    """
    cos = cosine(dot, g_sq, h_sq)
    fired = h_sq > 0.0 and g_sq > 0.0 and cos < target
    if not fired:
        return 0.0, cos, False
    cos_c = max(-1.0, min(1.0, cos))
    lam = math.sqrt(g_sq) * (target * math.sqrt(max(0.0, 1.0 - cos_c**2)) - cos_c * math.sqrt(1.0 - target**2))
    lam /= math.sqrt(h_sq) * math.sqrt(1.0 - target**2)
    return lam, cos, True


# --------------------------------------------------------------------------- projection plan
@dataclass(frozen=True)
class ModulePlan:
    """How one module's gradient is reconciled: G̃ = g + coef·h (then optional norm rescale),
    or, for nullspace, G̃ = g − c·U Uᵀ g with U the top-`nullspace_rank` left singular vectors of h."""

    coef: float = 0.0
    fired: bool = False
    cos: float = 0.0
    rescale_to: float | None = None  # magnitude_preserving: ‖g_m‖ when fired
    nullspace_rank: int | None = None
    c: float = 0.0
    seed: int = 0


def check_projection_args(operator: str, c: float, scope: str, threshold: float, nullspace_rank: int | None) -> None:
    if operator not in OPERATORS:
        raise ValueError(f"operator={operator!r}; valid: {', '.join(OPERATORS)}")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}; valid: {', '.join(SCOPES)}")
    if not 0.0 <= float(c) <= 1.0:
        raise ValueError(f"c={c} is outside [0, 1]")
    if scope == "global" and operator not in GLOBAL_OPERATORS:
        raise ValueError(
            f"operator={operator!r} has no global form; use scope=per_module or one of {', '.join(GLOBAL_OPERATORS)}"
        )
    if operator == "gradvac" and not -1.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold={threshold} is the GradVac target cosine and must lie in (-1, 1)")
    if operator == "nullspace":
        if nullspace_rank is None or int(nullspace_rank) < 1:
            raise ValueError(f"operator=nullspace needs nullspace_rank >= 1, got {nullspace_rank}")
        if float(threshold) != 0.0:
            raise ValueError("operator=nullspace projects every module; threshold has no effect, leave it 0")
    elif nullspace_rank is not None:
        raise ValueError(f"nullspace_rank={nullspace_rank} only applies to operator=nullspace")


def module_seed(seed: int, name: str) -> int:
    """A per-module seed independent of iteration order."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)


def projection_plan(
    dots: Mapping[str, tuple[float, float, float]],
    *,
    operator: str = "pcgrad",
    c: float = 1.0,
    scope: str = "global",
    threshold: float = 0.0,
    nullspace_rank: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, ModulePlan], dict]:
    """Per-module plans and JSON stats from per-module (⟨g,h⟩, ‖g‖², ‖h‖²).

    Global scope sums the inner products over modules: one γ for the whole model, i.e. PCGrad
    on the concatenated gradient. Per-module cosines are reported in both scopes.
    """
    check_projection_args(operator, c, scope, threshold, nullspace_rank)
    c = float(c)
    tot_dot = sum(d[0] for d in dots.values())
    tot_g = sum(d[1] for d in dots.values())
    tot_h = sum(d[2] for d in dots.values())
    cos_global = cosine(tot_dot, tot_g, tot_h)
    module_cos = {n: cosine(*d) for n, d in dots.items()}

    plans: dict[str, ModulePlan] = {}
    gamma_global = None
    if scope == "global":
        gamma_global, _, fired_global = pcgrad_gamma(tot_dot, tot_g, tot_h, threshold)
        for n, (_, g_sq, _) in dots.items():
            rescale = math.sqrt(g_sq) if (operator == "magnitude_preserving" and fired_global and c > 0) else None
            plans[n] = ModulePlan(c * gamma_global, fired_global, module_cos[n], rescale, None, c)
    else:
        for n, (dot, g_sq, h_sq) in dots.items():
            if operator == "nullspace":
                plans[n] = ModulePlan(
                    0.0, h_sq > 0.0, module_cos[n], None, int(nullspace_rank), c, module_seed(seed, n)
                )
                continue
            if operator == "gradvac":
                k, _, fired = gradvac_lambda(dot, g_sq, h_sq, threshold)
            else:
                k, _, fired = pcgrad_gamma(dot, g_sq, h_sq, threshold)
            rescale = math.sqrt(g_sq) if (operator == "magnitude_preserving" and fired and c > 0) else None
            plans[n] = ModulePlan(c * k, fired, module_cos[n], rescale, None, c)

    n_fired = sum(p.fired for p in plans.values())
    cos_values = sorted(module_cos.values())
    stats = {
        "operator": operator,
        "scope": scope,
        "c": c,
        "threshold": float(threshold),
        # The gate's decision, and whether it changed anything (c = 0 never does).
        "fired": n_fired > 0,
        "changed": n_fired > 0 and c > 0,
        "cos_global": cos_global,
        "gamma": gamma_global,
        "grad_norm_cur": math.sqrt(tot_g),
        "grad_norm_prev": math.sqrt(tot_h),
        "per_module": {
            "n": len(plans),
            "fired": n_fired,
            "cos_min": cos_values[0] if cos_values else None,
            "cos_median": _median(cos_values),
            "cos_mean": sum(cos_values) / len(cos_values) if cos_values else None,
            "cos_max": cos_values[-1] if cos_values else None,
            "negative_cos": sum(v < 0 for v in cos_values),
        },
    }
    if scope == "per_module" and operator != "nullspace":
        coefs = [p.coef for p in plans.values() if p.fired]
        stats["per_module"]["coef_mean_fired"] = sum(coefs) / len(coefs) if coefs else None
    return plans, stats


def _median(sorted_values: list[float]) -> float | None:
    n = len(sorted_values)
    if n == 0:
        return None
    mid = n // 2
    return sorted_values[mid] if n % 2 else 0.5 * (sorted_values[mid - 1] + sorted_values[mid])


def apply_plan(g: torch.Tensor, h: torch.Tensor, plan: ModulePlan) -> torch.Tensor:
    """G̃ for one module (a new float32 tensor; g and h are not modified)."""
    g = g.float()
    if plan.nullspace_rank is not None:
        if plan.c == 0.0 or not plan.fired:
            return g.clone()
        k = min(plan.nullspace_rank, min(h.shape))
        U, _, _ = randomized_svd(h.float(), q=oversampled_columns(k, h.shape), niter=4, seed=plan.seed)
        U = U[:, :k]
        return g - plan.c * (U @ (U.T @ g))
    if not plan.fired or plan.coef == 0.0:
        return g.clone()
    out = g + plan.coef * h.float()
    if plan.rescale_to is not None:
        norm = float(out.double().norm())
        if norm > 0.0:
            out = out * (plan.rescale_to / norm)
    return out


def project_gradients(
    g: Mapping[str, torch.Tensor], h: Mapping[str, torch.Tensor], **kwargs
) -> tuple[dict[str, torch.Tensor], dict]:
    """ψ(g, h) for all modules at once (convenience for small models and tests)."""
    dots = {n: inner_products(g[n], h[n]) for n in g}
    plans, stats = projection_plan(dots, **kwargs)
    return {n: apply_plan(g[n], h[n], plans[n]) for n in g}, stats


# --------------------------------------------------------------------------- SVD selection
def randomized_svd(
    M: torch.Tensor, q: int, niter: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank(M, q, niter) with its Gaussian sketch drawn from `seed`.

    The global RNG is forked, so callers' random streams are untouched.
    """
    on_accelerator = M.device.type != "cpu"
    devices = [M.device] if on_accelerator else []
    with torch.random.fork_rng(devices=devices, device_type=M.device.type if on_accelerator else "cuda"):
        torch.manual_seed(seed)
        return torch.svd_lowrank(M, q=q, niter=niter)


def oversampled_columns(k: int, shape: tuple[int, ...]) -> int:
    """Sketch width for the top-k singular vectors: q = 4k columns, the oversampling the LoRA-GA
    selection uses (q = 4r), capped at min(shape). With q = k a flat spectrum mixes the k-th and
    later directions into the result (Halko et al. 2011, §10: the error falls with q - k)."""
    return min(4 * int(k), min(shape))


def canonical_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each singular pair (u_i, v_i) signed so that the largest-magnitude entry of u_i is positive.

    An SVD fixes each pair only up to (−u_i, −v_i). Products that pair u_i with another index's v
    (LoRA-GA's B·A = Σ u_i·v_{r+i}ᵀ) change with that choice, and LAPACK's choice is not continuous:
    torch.svd_lowrank flipped single pairs of a real gradient under a 1e-7 relative perturbation
    (a different batch split or rank count). With this convention the result is a function of M."""
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx.unsqueeze(0))).squeeze(0)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, V * signs


def top_singular(M: torch.Tensor, q: int, *, method: str = "randomized", niter: int = 4, seed: int = 0):
    """(U[:, :q], S[:q], V[:, :q]) of M by the randomized range finder or the exact SVD, each pair
    in the sign convention of `canonical_signs`."""
    if method == "randomized":
        U, S, V = randomized_svd(M, q=q, niter=niter, seed=seed)
    elif method == "exact":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        U, S, V = U[:, :q], S[:q], Vh[:q].T
    else:
        raise ValueError(f"svd={method!r}; valid: {', '.join(SVD_METHODS)}")
    U, V = canonical_signs(U, V)
    return U, S, V


def lora_ga_selection(
    G: torch.Tensor, r: int, *, method: str = "randomized", niter: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-GA / SLICE Eq. 7: B = U[:, :r], A = V[:, r:2r]ᵀ from the SVD of G (q = 4r columns).

    Returns (A [r, d_in], B [d_out, r], S) with S the q leading singular values (for the
    captured-mass statistic). Needs 2r ≤ min(d_out, d_in).
    """
    d_out, d_in = G.shape
    if 2 * r > min(d_out, d_in):
        raise ValueError(f"rank {r}: 2r={2 * r} exceeds min(d_out, d_in)={min(d_out, d_in)}")
    q = min(4 * r, d_out, d_in)
    U, S, V = top_singular(G.float(), q, method=method, niter=niter, seed=seed)
    B = U[:, :r].contiguous()
    A = V[:, r : 2 * r].T.contiguous()
    return A, B, S


def singular_value_mass(S: torch.Tensor, total_sq: float, k: int) -> float:
    """Fraction of ‖G‖_F² carried by the k leading singular values."""
    if total_sq <= 0.0:
        return 0.0
    return float((S[:k].double() ** 2).sum()) / total_sq


# --------------------------------------------------------------------------- magnitude rescale
def product_variance(B: torch.Tensor, A: torch.Tensor) -> float:
    """Unbiased variance of the entries of B·A without forming the d_out×d_in product.

    Σ(BA)² = ⟨BᵀB, AAᵀ⟩ and Σ BA = (1ᵀB)(A1), both from r-sized quantities.
    """
    B64, A64 = B.double(), A.double()
    n = B.shape[0] * A.shape[1]
    total = float(B64.sum(0) @ A64.sum(1))
    sq = float(((B64.T @ B64) * (A64 @ A64.T)).sum())
    return (sq - total * total / n) / (n - 1)


def rank_factor(r: int, d_out: int, d_in: int) -> float:
    """η_r = log_m r with m = min(d_out, d_in) (LoRAM's rank-dependent target ratio)."""
    m = min(d_out, d_in)
    return math.log(r) / math.log(m)


def magnitude_beta(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    """β = (η_r·η_var)^(1/4), η_var = Var(W)/Var(BA); then Var(βB·βA) = η_r·Var(W)."""
    r = A.shape[0]
    var_w = float(W.detach().float().var())
    var_ba = product_variance(B, A)
    eta = rank_factor(r, *W.shape) * var_w / max(var_ba, 1e-30)
    return max(eta, 0.0) ** 0.25


def rescale_factors(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    beta = magnitude_beta(W, A, B)
    return A * beta, B * beta, beta


def stable_scale(d_out: int, gamma: float) -> float:
    """LoRA-GA's stable scale ζ = d_out^(1/4)/√γ (Wang et al. 2024, LoRA-GA, §3.3 "scale
    stability"; the authors' code, scale == "stable"): multiplying both A and B by ζ keeps the
    adapter output's scale independent of the width; γ is the `stable_gamma` hyperparameter."""
    if d_out < 1 or gamma <= 0:
        raise ValueError(f"stable_scale needs d_out >= 1 and gamma > 0, got d_out={d_out}, gamma={gamma}")
    return d_out**0.25 / math.sqrt(gamma)


def stable_scale_factors(A: torch.Tensor, B: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(ζ·A, ζ·B, ζ) with ζ = stable_scale(d_out, γ), d_out = B.shape[0]; the singular values of
    the gradient are not used (A, B are the orthonormal singular vectors)."""
    zeta = stable_scale(B.shape[0], gamma)
    return A * zeta, B * zeta, zeta


# --------------------------------------------------------------------------- data-free bases
def dst1_rows(n: int, k: int, device=None) -> torch.Tensor:
    """First k rows of the orthonormal n×n DST-I matrix: sqrt(2/(n+1))·sin(π(i+1)(j+1)/(n+1))."""
    i = torch.arange(1, k + 1, dtype=torch.float64, device=device).unsqueeze(1)
    j = torch.arange(1, n + 1, dtype=torch.float64, device=device).unsqueeze(0)
    return (math.sqrt(2.0 / (n + 1)) * torch.sin(math.pi * i * j / (n + 1))).float()


def dst1_factors(d_out: int, d_in: int, r: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRAM bases: A = first r DST-I rows over d_in, B = first r DST-I columns over d_out."""
    if r > min(d_out, d_in):
        raise ValueError(f"rank {r} exceeds min(d_out, d_in)={min(d_out, d_in)}")
    return dst1_rows(d_in, r, device), dst1_rows(d_out, r, device).T.contiguous()


def minor_component_factors(W: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MiLoRA: (A, B) with scaling·B·A = the r minor singular components of W.

    A = sqrt(σ/s)·V_minᵀ, B = U_min·sqrt(σ/s) (PiSSA's split, on the smallest σ); absorbing
    s·B·A leaves W's principal part in the base weight.
    """
    if r > min(W.shape):
        raise ValueError(f"rank {r} exceeds min(d_out, d_in)={min(W.shape)}")
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    root = (S[-r:] / scaling).sqrt()
    B = (U[:, -r:] * root).contiguous()
    A = (root.unsqueeze(1) * Vh[-r:]).contiguous()
    return A, B


# --------------------------------------------------------------------------- subspace memory
# GPM (Saha et al. 2021), InfLoRA (Liang & Li 2024) and GainLoRA's gate memory share these: a
# per-module orthonormal basis M [d, k] of earlier tasks' input representations, grown by an
# energy threshold, and projections off it. Representations enter as their Gram matrix
# C = R·Rᵀ [d, d] (R [d, n]: one column per real token), so σ_i(R)² = λ_i(C) and n may be huge.


def stage_threshold(threshold: float, increment: float, stage: int) -> float:
    """ε_th of the memory built after stage `stage` (1-based): min(1, ε + increment·(stage − 1)).

    GPM raises ε_th by a fixed amount per task on some benchmarks (e.g. 0.97 + 0.003 per task on
    CIFAR-100); InfLoRA's LLM code uses ε0 + (1 − ε0)·(t − 1)/T, i.e. increment = (1 − ε0)/T.
    Raises ValueError unless 0 ≤ ε ≤ 1 and increment ≥ 0.
    """
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold={threshold} is outside [0, 1]")
    if float(increment) < 0.0:
        raise ValueError(f"threshold_increment={increment} must be >= 0")
    return min(1.0, float(threshold) + float(increment) * (int(stage) - 1))


# How a memory's basis grows (basis_update's `criterion`):
#   energy     — GPM's paper (Saha et al. 2021, Eqs. 16, 20–22): the energy of the representation
#                matrix R, σ_i(R)² = λ_i(C), and at every task the smallest k whose total reaches ε.
#   covariance — the InfLoRA and GainLoRA authors' code (liangyanshuo/gainlora, cl_trainer_inflora.py
#                and cl_trainer_gainlora_inflora.py): the SVD of the covariance C itself, its squared
#                singular values σ_i(C)² = σ_i(R)⁴ ranking the directions (so the basis grows as GPM's
#                on the representation C, whose Gram is C²); the first task keeps
#                k = #{k: cumulative share < ε} (`sum(cumsum < ε)`, at least 1: one direction fewer
#                than the smallest k reaching ε), later tasks the smallest k (the code's loop).
#   On λ_i(C) = 1/i at d = 256: energy at ε = 0.97 keeps 213 directions, covariance at 0.995 keeps 82.
CRITERIA = ("energy", "covariance")


def basis_update(
    basis: torch.Tensor | None, gram: torch.Tensor, threshold: float, criterion: str = "energy"
) -> tuple[torch.Tensor, dict]:
    """Grow an orthonormal basis M [d, k] by the energy threshold (GPM Eqs. 16, 20–22).

    gram: C = R·Rᵀ [d, d] of the new task's representations R [d, n]. With ‖R‖² = tr C:
      * M empty (the first task, Eq. 16): keep the k leading eigenvectors of C (= left singular
        vectors of R) with the smallest k such that Σ_{i≤k} σ_i² ≥ ε·‖R‖².
      * otherwise (Eqs. 20–22): R̂ = R − M·Mᵀ·R (Eq. 20), so R̂·R̂ᵀ = P·C·P with P = I − M·Mᵀ; its
        eigenvectors û_i, σ̂_i² (Eq. 21) are appended (Eq. 22) for the smallest k such that
        ‖Mᵀ·R‖² + Σ_{i≤k} σ̂_i² ≥ ε·‖R‖², the criterion on the TOTAL energy as in GPM (k = 0 when
        the old basis already holds a fraction ε of it).
    criterion="covariance" (the InfLoRA/GainLoRA authors' rule, see CRITERIA above) does the same
    with C in place of R (Gram C², directions of P·C), keeping one direction fewer on the first task.
    Only directions with σ̂² > 1e-12·‖R‖² are ever added (numerically null directions of P·C·P may
    lie inside span M), so k ≤ d − k_old. Computed in float64; returns (M_new float32 [d, k_old + k]
    on gram's device, stats). Raises ValueError for a non-square gram, a basis of another d, ε
    outside [0, 1] or an unknown criterion.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square [d, d], got {tuple(gram.shape)}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold={threshold} is outside [0, 1]")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}; valid: {', '.join(CRITERIA)}")
    d = gram.shape[0]
    C = gram.detach().double()
    C = 0.5 * (C + C.T)
    if criterion == "covariance":  # the covariance as the representation: its Gram is C²
        C = C @ C
        C = 0.5 * (C + C.T)
    M = C.new_zeros(d, 0) if basis is None else basis.detach().to(C)
    if M.shape[0] != d:
        raise ValueError(f"basis has d={M.shape[0]} but gram has d={d}")
    total = float(torch.trace(C))
    stats = {
        "d": d,
        "k_old": M.shape[1],
        "k_added": 0,
        "k": M.shape[1],
        "threshold": float(threshold),
        "criterion": criterion,
        "energy_old": 0.0,
        "energy_kept": 0.0,
    }
    if total <= 0.0:
        return M.float(), stats
    if M.shape[1]:
        P = torch.eye(d, dtype=C.dtype, device=C.device) - M @ M.T
        C_hat = P @ C @ P
    else:
        C_hat = C
    lam, U = torch.linalg.eigh(0.5 * (C_hat + C_hat.T))
    lam, U = lam.flip(0).clamp_min(0.0), U.flip(1)
    energy_old = max(0.0, total - float(lam.sum()))  # ‖Mᵀ R‖² = ‖R‖² − ‖R̂‖²
    first_by_code = criterion == "covariance" and not M.shape[1]  # the authors' first task: sum(cumsum < ε)
    k = _directions_to_add(lam, float(threshold) * total - energy_old, total, d - M.shape[1], first_by_code)
    new = U[:, :k]
    if M.shape[1] and k:  # re-orthogonalise against M (removes rounding, keeps the directions)
        new = new - M @ (M.T @ new)
        new = new / new.norm(dim=0, keepdim=True)
    stats.update(
        k_added=k,
        k=M.shape[1] + k,
        energy_old=energy_old / total,
        energy_kept=(energy_old + float(lam[:k].sum())) / total,
    )
    return torch.cat([M, new], dim=1).float(), stats


def _directions_to_add(lam: torch.Tensor, need: float, total: float, room: int, below: bool = False) -> int:
    """The smallest k with Σ_{i≤k} λ_i ≥ need (0 when need ≤ 0); below=True: #{k: Σ_{i≤k} λ_i < need},
    at least 1 (the authors' first-task count). Never a numerically null direction (λ ≤ 1e-12·total),
    never more than `room`."""
    if need <= 0.0:
        return 0
    count = int((torch.cumsum(lam, 0) < need).sum())
    k = max(count, 1) if below else count + 1
    return min(k, int((lam > 1e-12 * total).sum()), room)


def project_off(X: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """X − X·M·Mᵀ: every row of X [.., d] with its component in span M [d, k] removed (GPM Eq. 18).

    Computed in float32 (float64 if X is), returned in X's dtype; M must be orthonormal."""
    work = torch.float64 if X.dtype == torch.float64 else torch.float32
    Xw, M = X.to(work), basis.to(device=X.device, dtype=work)
    return (Xw - (Xw @ M) @ M.T).to(X.dtype)


def pin_update(W: torch.Tensor, W0: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """W0 + (W − W0)·(I − M·Mᵀ) [d_out, d_in] float32: the update W − W0 made so far with its
    component on span M [d_in, k] removed, so W'·x = W0·x for every x ∈ span M.

    GPM's Eq. 18 (GainLoRA's Eq. 32 on a gate layer) applied to the step of any optimizer instead of
    the gradient: Adam(W)'s per-element 1/√v rescale does not commute with the gradient projection,
    this does. Under SGD with projected gradients it changes nothing."""
    W32, W0_32 = W.detach().float(), W0.detach().to(device=W.device, dtype=torch.float32)
    return W0_32 + project_off(W32 - W0_32, basis)


def range_basis(X: torch.Tensor, tol: float) -> torch.Tensor:
    """Orthonormal basis [m, q] of the column space of X [m, n]: left singular vectors with σ > tol."""
    if X.numel() == 0:
        return X.new_zeros(X.shape[0], 0)
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    return U[:, S > tol]


def lora_input_basis(A: torch.Tensor, basis: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """Q [r, q]: orthonormal basis of col(A·M) ⊂ ℝ^r, the inputs B receives from old-task x ∈ span M.

    A: [r, d_in]; basis M: [d_in, k]. Keeps singular directions with σ > rtol·‖A‖_F, so an A
    orthogonal to M up to rounding gives q = 0 (B unconstrained)."""
    AM = A.detach().float() @ basis.to(device=A.device, dtype=torch.float32)
    return range_basis(AM, rtol * float(A.detach().float().norm()))


def gpm_lora_gradients(
    grad_A: torch.Tensor, grad_B: torch.Tensor, basis: torch.Tensor, Q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPM's projection (Eq. 18) carried to the LoRA factors of ΔW = s·B·A; returns (∇A', ∇B') float32.

    grad_A: [r, d_in]; grad_B: [d_out, r]; basis M: [d_in, k] orthonormal, spanning old inputs;
    Q = lora_input_basis(A, M) [r, q].
      ∇A' = ∇A − ∇A·M·Mᵀ      (input side: the rows of ∇A leave span M alone)
      ∇B' = ∇B − ∇B·Q·Qᵀ      (B's inputs on old x are A·x ∈ col(A·M) = col Q)
    Why this protects old inputs x ∈ span M (Eq. 19): one SGD step of size η changes s·B·A by
      −η·s·(∇B'·A + B·∇A') + η²·s·∇B'·∇A'.
    ∇A'·x = 0 removes the second term and the second-order term; A·x ∈ col Q and ∇B'·Q = 0 remove
    the first. Since ∇A'·M = 0 the step leaves A·M, hence Q, unchanged, so under SGD the
    protection is exact to all orders over a whole stage, not only to first order. It is
    approximate for x only approximately in span M (the energy 1 − ε_th left out) and under
    Adam(W), whose elementwise 1/√v rescale does not commute with the projection (momentum
    alone would); gpm_lora_pin restores it. A component projected away entirely (q = r, k = d_in)
    is set to exactly 0: Adam would otherwise rescale its rounding noise to full-size steps.
    If q = r, ∇B' ≡ 0: a stage whose A starts with rank-r components in span M can train only
    A's part in M⟂ (nothing at all if B starts at 0), hence GPM's `project_init`.
    """
    M = basis.to(device=grad_A.device, dtype=torch.float32)
    gA = torch.zeros_like(grad_A, dtype=torch.float32) if M.shape[1] >= M.shape[0] else project_off(grad_A.float(), M)
    gB = grad_B.float()
    if Q.shape[1] >= Q.shape[0]:
        gB = torch.zeros_like(gB)
    elif Q.shape[1]:
        Q = Q.to(device=gB.device, dtype=torch.float32)
        gB = gB - (gB @ Q) @ Q.T
    return gA, gB


def gpm_lora_pin(
    A: torch.Tensor, B: torch.Tensor, basis: torch.Tensor, Q: torch.Tensor, AM0: torch.Tensor, BQ0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') float32 with A'·M = A0·M and B'·Q = B0·Q: any optimizer's step projected like Eq. 18.

    AM0 = A0·M [r, k] and BQ0 = B0·Q [d_out, q] are taken at the stage start (Q = orth(A0·M)).
    A' = A − (A·M − A0·M)·Mᵀ and B' = B − (B·Q − B0·Q)·Qᵀ remove exactly the parts of the updates
    so far that lie in span M (for A) and col Q (for B); then for x = M·c,
    s·B'·A'·x = s·B'·A0·M·c = s·B'·Q·Qᵀ·A0·M·c = s·B0·A0·x: the stage leaves old inputs' outputs
    unchanged whatever the optimizer (up to the σ(A0·M) ≤ rtol·‖A0‖ directions left out of Q).
    Under SGD with gpm_lora_gradients it changes nothing (the steps are already projected).
    """
    M = basis.to(device=A.device, dtype=torch.float32)
    A32, B32 = A.detach().float(), B.detach().float()
    A_new = A32 - (A32 @ M - AM0.to(A32)) @ M.T
    if Q.shape[1]:
        Q = Q.to(B32)
        B32 = B32 - (B32 @ Q - BQ0.to(B32)) @ Q.T
    return A_new, B32


def project_rows(A: torch.Tensor, basis: torch.Tensor, keep_norm: bool = True) -> torch.Tensor:
    """The rows of A [r, d] projected off span M [d, k] (A − A·M·Mᵀ), float32.

    keep_norm rescales every row back to its norm before the projection (a row that vanishes
    stays 0): a Kaiming-uniform row of PEFT's default A has norm ≈ 1/√3, the value InfLoRA's LLM
    code rescales its projected rows to.
    """
    A32 = A.detach().float()
    out = project_off(A32, basis)
    if keep_norm:
        before, after = A32.norm(dim=1, keepdim=True), out.norm(dim=1, keepdim=True)
        scale = torch.where(
            after > 1e-12 * before.clamp_min(1e-30), before / after.clamp_min(1e-30), torch.zeros_like(after)
        )
        out = out * scale
    return out


def principal_rows(gram: torch.Tensor, basis: torch.Tensor | None, r: int) -> torch.Tensor:
    """InfLoRA's designed A (CVPR 2024): the r leading eigenvectors of P·C·P as rows [r, d], float32.

    C = H·Hᵀ of the new task's inputs H [d, n], P = I − M·Mᵀ, so the rows span the top principal
    directions of Ĥ = H − M·Mᵀ·H, inside span M⟂ and orthonormal. A small multiple of P is added
    before the eigendecomposition so that directions of M⟂ that the data does not reach still
    rank above span M; if d − k < r the remaining rows are 0 (no room left outside the memory).
    """
    d = gram.shape[0]
    C = gram.detach().double()
    M = C.new_zeros(d, 0) if basis is None else basis.detach().to(C)
    P = torch.eye(d, dtype=C.dtype, device=C.device) - M @ M.T
    C_hat = P @ C @ P
    C_hat = 0.5 * (C_hat + C_hat.T) + 1e-9 * (float(torch.trace(C)) / d + 1.0) * P
    _, U = torch.linalg.eigh(C_hat)
    room = min(r, d - M.shape[1])
    rows = U.flip(1)[:, :room].T
    if M.shape[1]:
        rows = rows - (rows @ M) @ M.T
        rows = rows / rows.norm(dim=1, keepdim=True)
    out = C.new_zeros(r, d)
    out[:room] = rows
    return out.float()

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
from dataclasses import dataclass
from typing import Mapping

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
                plans[n] = ModulePlan(0.0, h_sq > 0.0, module_cos[n], None, int(nullspace_rank), c, module_seed(seed, n))
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
def randomized_svd(M: torch.Tensor, q: int, niter: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def top_singular(M: torch.Tensor, q: int, *, method: str = "randomized", niter: int = 4, seed: int = 0):
    """(U[:, :q], S[:q], V[:, :q]) of M by the randomized range finder or the exact SVD."""
    if method == "randomized":
        return randomized_svd(M, q=q, niter=niter, seed=seed)
    if method == "exact":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :q], S[:q], Vh[:q].T
    raise ValueError(f"svd={method!r}; valid: {', '.join(SVD_METHODS)}")


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


def stable_scale_factors(
    A: torch.Tensor, B: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
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

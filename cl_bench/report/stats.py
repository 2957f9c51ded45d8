"""Paired significance tests over seeds: is a method's difference to a baseline larger than the
seed-to-seed noise? Pure functions on score lists (percent), no model code.

Pairing: the method's run and the baseline's run with the same seed share the data order, the
evaluation subset and the seeded randomness, so the per-seed differences d_k = x_k − y_k remove
the variance both share. Two tests on d, both from scipy (present through the pinned lm-eval →
scikit-learn → scipy):
- the paired t-test (Student 1908; `scipy.stats.ttest_rel`, two-sided): t = mean(d) / (sd(d)/√n)
  on n − 1 degrees of freedom. Assumes the d_k are normal, which 3 seeds cannot check.
- the sign-flip permutation test (Fisher 1935; `scipy.stats.permutation_test` with
  permutation_type="samples", exact for n ≤ MAX_EXACT_N): under H0 each d_k is equally likely
  ±|d_k|; p = share of the 2^n sign patterns whose |mean| ≥ the observed |mean|. No
  distributional assumption, but coarse: the smallest two-sided p is 2/2^n (0.25 at n = 3,
  0.0625 at n = 5), so at small n it cannot reach 0.05 whatever the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_EXACT_N = 16  # 2^16 sign patterns enumerated; above, 100,000 random patterns (seeded)


@dataclass(frozen=True)
class PairedTest:
    """n pairs; mean and sample std (ddof 1) of d = x − y (points); t statistic; two-sided
    p-values of the t-test and the sign-flip test; the smallest p the sign-flip test can give at
    this n. Fields are NaN when not computable (n < 2; t and p_t also when sd(d) = 0)."""

    n: int
    mean_diff: float
    std_diff: float
    t: float
    p_t: float
    p_signflip: float
    min_p_signflip: float


def _mean_diff(x, y, axis):
    return np.mean(x - y, axis=axis)


def paired_test(x: Sequence[float], y: Sequence[float]) -> PairedTest:
    """Paired tests of x (method) against y (baseline), pairs in the same order (same seed).

    Raises ValueError when the lengths differ or a value is not finite."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired_test needs two equal-length lists, got shapes {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired_test needs finite scores")
    n = len(x)
    nan = float("nan")
    if n == 0:
        return PairedTest(0, nan, nan, nan, nan, nan, nan)
    d = x - y
    mean = float(d.mean())
    if n < 2:
        return PairedTest(n, mean, nan, nan, nan, nan, 1.0)
    from scipy.stats import permutation_test, ttest_rel

    sd = float(d.std(ddof=1))
    t = p_t = nan
    if sd > 0:  # sd = 0: t is ±inf or undefined; the sign-flip p still says what n allows
        res = ttest_rel(x, y)
        t, p_t = float(res.statistic), float(res.pvalue)
    exact = n <= MAX_EXACT_N
    flip = permutation_test(
        (x, y),
        _mean_diff,
        permutation_type="samples",
        vectorized=True,
        alternative="two-sided",
        n_resamples=np.inf if exact else 100_000,
        rng=np.random.default_rng(0),
    )
    return PairedTest(n, mean, sd, t, p_t, float(flip.pvalue), min(1.0, 2.0 / 2**n))


def fmt_p(p: float | None) -> str:
    """p-values for tables: 3 significant digits, '<0.001' below, 'n/a' when not computable."""
    if p is None or not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3g}"

"""CL metrics over the results matrix, exactly as defined in docs/design.md §7.

R has rows 0..T (row 0 = before training, row i = after stage i) and columns for tasks 1..T
(column j-1 holds task j). Scores in percent. A metric whose cells are missing (None) is None:
nothing is silently averaged over a partial matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import StatisticsError, fmean

Matrix = Sequence[Sequence[float | None]]


def _cell(R: Matrix, i: int, j: int) -> float:
    """R[i, j] with 1-based task index j; raises KeyError when missing."""
    value = R[i][j - 1]
    if value is None:
        raise KeyError((i, j))
    return float(value)


def _num_tasks(R: Matrix) -> int:
    T = len(R[0]) if R else 0
    if len(R) != T + 1 or any(len(row) != T for row in R):
        raise ValueError(f"results matrix must have T+1 rows of T scores; got {len(R)} rows for T={T}")
    return T


def _guard(fn):
    def wrapped(R: Matrix, *args):
        try:
            return fn(R, _num_tasks(R), *args)
        except (KeyError, StatisticsError):  # a missing cell, or no term (T = 1)
            return None

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


@_guard
def average_performance(R, T):
    """AP = mean_i R[i, i]."""
    return fmean(_cell(R, i, i) for i in range(1, T + 1))


@_guard
def final_performance(R, T):
    """FP = mean_j R[T, j]."""
    return fmean(_cell(R, T, j) for j in range(1, T + 1))


def forgetting(R: Matrix) -> float | None:
    """Fgt = AP − FP."""
    ap, fp = average_performance(R), final_performance(R)
    return None if ap is None or fp is None else ap - fp


@_guard
def backward_transfer(R, T):
    """BWT = mean_{j<T} (R[T, j] − R[j, j])."""
    return fmean(_cell(R, T, j) - _cell(R, j, j) for j in range(1, T))


@_guard
def forward_transfer(R, T):
    """FWT = mean_{j≥2} (R[j−1, j] − R[0, j])."""
    return fmean(_cell(R, j - 1, j) - _cell(R, 0, j) for j in range(2, T + 1))


@_guard
def forgetting_from_peak(R, T):
    """FR = mean_{j<T} (max_{j≤i<T} R[i, j] − R[T, j])."""
    return fmean(max(_cell(R, i, j) for i in range(j, T)) - _cell(R, T, j) for j in range(1, T))


@_guard
def weighted_final_accuracy(R, T, sizes: Sequence[int]):
    """Acc = mean_j R[T, j] weighted by test-set size."""
    if len(sizes) != T:
        raise ValueError(f"need {T} test-set sizes, got {len(sizes)}")
    return sum(_cell(R, T, j) * sizes[j - 1] for j in range(1, T + 1)) / sum(sizes)


@_guard
def average_anytime_accuracy(R, T):
    """AAA = mean_k mean_{j≤k} R[k, j]."""
    return fmean(fmean(_cell(R, k, j) for j in range(1, k + 1)) for k in range(1, T + 1))


def compute_cl_metrics(R: Matrix, sizes: Sequence[int]) -> dict[str, float | None]:
    return {
        "AP": average_performance(R),
        "FP": final_performance(R),
        "Fgt": forgetting(R),
        "BWT": backward_transfer(R),
        "FWT": forward_transfer(R),
        "FR": forgetting_from_peak(R),
        "Acc": weighted_final_accuracy(R, sizes),
        "AAA": average_anytime_accuracy(R),
    }


def compute_mode_metrics(R: Matrix, sizes: Sequence[int], mode: str = "sequential") -> dict[str, float | None]:
    """The metrics of a run mode (cl_bench/run/modes.py). `sequential`: compute_cl_metrics on the
    T+1 rows. `multitask`: R has 2 rows (before, after joint training); `independent`: T+1 rows,
    row i = the base model trained on task i alone. For both, the score of task j once learned is
    s_j (multitask R[1, j], independent R[j, j]) and never changes afterwards, so
    AP = FP = mean_j s_j, Acc = the same weighted by test size, Fgt = BWT = FR = 0 by
    construction; FWT and AAA need the models between stages these modes do not have (None).
    A missing s_j makes every metric None. Raises ValueError for an unknown mode or a matrix of
    the wrong shape."""
    if mode == "sequential":
        return compute_cl_metrics(R, sizes)
    T = len(R[0]) if R else 0
    rows = 2 if mode == "multitask" else T + 1
    if mode not in ("multitask", "independent"):
        raise ValueError(f"unknown mode {mode!r}")
    if len(R) != rows or any(len(row) != T for row in R) or len(sizes) != T:
        raise ValueError(
            f"mode {mode}: need {rows} rows of {T} scores and {T} sizes; got {len(R)} rows, {len(sizes)} sizes"
        )
    learned = [R[1][j] if mode == "multitask" else R[j + 1][j] for j in range(T)]
    none = dict.fromkeys(("AP", "FP", "Fgt", "BWT", "FWT", "FR", "Acc", "AAA"))
    if T == 0 or any(v is None for v in learned):
        return none
    mean = fmean(float(v) for v in learned)
    acc = sum(float(v) * n for v, n in zip(learned, sizes)) / sum(sizes)
    zero_if_sequence = 0.0 if T > 1 else None  # BWT/FR average over j < T: no term at T = 1
    return {**none, "AP": mean, "FP": mean, "Fgt": 0.0, "BWT": zero_if_sequence, "FR": zero_if_sequence, "Acc": acc}

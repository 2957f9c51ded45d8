"""Cutting length-sorted rows into padded batches: the plan the training layout `group`, the
gradient capture and the seen-task evaluation share (one dynamic program, no model code)."""

from __future__ import annotations

from collections.abc import Sequence


def plan_groups(
    lengths: Sequence[int], max_tokens: int, overhead_tokens: int = 0, max_rows: int | None = None
) -> list[list[int]]:
    """Partition rows into batches, each padded to its own longest row.

    Rows are taken longest first (ties by index, so the plan is a pure function of the
    lengths); a batch is a run of that order. The runs minimise
        Σ_batches (rows · longest + overhead_tokens)
    subject to rows · longest <= max_tokens (a row longer than max_tokens goes alone) and
    rows <= max_rows (None: no row cap). O(n²) dynamic program, n = rows.

    Returns lists of indices into `lengths`, longest batch first.
    Example: lengths [10, 2, 9, 3], max_tokens 100, overhead 5 -> [[0, 2], [3, 1]]
    (2·10 + 5 + 2·3 + 5 = 36 tokens, against 4·10 + 5 = 45 in one batch).
    Raises ValueError on max_tokens < 1, overhead_tokens < 0 or max_rows < 1.
    """
    if max_tokens < 1 or overhead_tokens < 0 or (max_rows is not None and max_rows < 1):
        raise ValueError(
            f"max_tokens={max_tokens} must be >= 1, overhead_tokens={overhead_tokens} >= 0, max_rows={max_rows} >= 1"
        )
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    n = len(order)
    if n == 0:
        return []
    best = [0] + [None] * n  # best[j]: cheapest cost of order[:j]
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):  # batch order[i:j], padded to lengths[order[i]]
            rows, width = j - i, int(lengths[order[i]])
            if rows > 1 and (rows * width > max_tokens or (max_rows is not None and rows > max_rows)):
                break  # longer runs only grow
            cost = best[i] + rows * width + overhead_tokens
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]

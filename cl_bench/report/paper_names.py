"""Each paper's names for the CL metrics, and the one metric of theirs ours lacks (PS-LoRA's FR).

`python -m cl_bench.report DIR --metrics-as PAPER` heads a table with that paper's column names,
computed from the same results matrices as ours (tables.named_tables); docs/REPRODUCIBILITY.md
prints METRICS_AS with each paper's definition. Like FWT_scratch (collect.scratch_fwt, PS-LoRA's FWT),
FR_upto is computed here from each run's matrix, so runs of any age get it.
"""

from __future__ import annotations

from collections.abc import Sequence

# Each paper's column headers, in its order, and the metric of ours each one is (the keys of the
# report's METRICS: ours, plus FWT_scratch and FR_upto).
METRICS_AS: dict[str, dict[str, str]] = {
    "slice": {"AP": "AP", "FP": "FP", "Fgt": "Fgt", "GP": "GP", "IP": "IP"},  # SLICE §4, App. D
    "ps_lora": {"Acc": "Acc", "AAA": "AAA", "BWT": "BWT", "FWT": "FWT_scratch", "FR": "FR_upto"},  # App. A.2
    "gainlora": {"AP": "FP", "FT": "FR"},  # AP: mean score after the last task; FT: drop from the peak
    "o_lora": {"AP": "FP", "FT": "FR"},  # as GainLoRA's tables report O-LoRA
    "trace": {"OP": "FP", "BWT": "BWT"},  # TRACE's overall performance after the last task, backward transfer
}


def forgetting_rate_up_to_learning(R: Sequence[Sequence[float | None]]) -> float | None:
    """FR as PS-LoRA (App. A.2) writes it: mean_{i<T} (max_{1≤j≤i} R[j, i] − R[T, i]), the peak of
    task i over the stages up to and including the one that learned it (a_{i,j}, j ≤ i).

    R: rows 0..T (0 = before training), T scores each, in percent. Ours, FR, takes the peak over
    the stages after the task is learned (i ≤ j < T): a task that peaks later counts that later
    peak there, not here. None when a cell it needs is missing or T < 2; ValueError when R is not
    T + 1 rows of T scores."""
    T = len(R[0]) if R else 0
    if len(R) != T + 1 or any(len(row) != T for row in R):
        raise ValueError(f"results matrix must have T+1 rows of T scores; got {len(R)} rows for T={T}")
    if T < 2:
        return None
    drops = []
    for i in range(1, T):  # task i (1-based) is column i - 1
        cells = [R[j][i - 1] for j in range(1, i + 1)] + [R[T][i - 1]]
        if any(c is None for c in cells):
            return None
        drops.append(max(float(c) for c in cells[:-1]) - float(cells[-1]))
    return sum(drops) / len(drops)

"""Figures of a run or a sweep, as pure functions: data in, matplotlib Figure out.

Used by the W&B tracker (images per run) and by the report (files). Every function builds a
`matplotlib.figure.Figure` directly (Agg canvas, no pyplot): nothing global is touched, no
backend is switched, no figure registry grows across the jobs of one process.

Scores and metrics are in percent (0..100), as in results.json (docs/design.md §6, §7).
Figures follow the SLICE paper (arXiv 2605.12752): R heatmaps (Fig. 3), the stability-plasticity
plane FP vs AP (Fig. 1), metrics across alpha (Fig. 4).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

METRIC_LABELS = {
    "AP": "AP (avg. right after training, %)",
    "FP": "FP (final avg., %)",
    "Fgt": "Fgt = AP − FP (points)",
    "BWT": "BWT (points)",
    "FWT": "FWT (points)",
    "FR": "FR (points)",
    "Acc": "Acc (%)",
    "AAA": "AAA (%)",
    "GP": "GP (zero-shot general, %)",
    "IP": "IP (few-shot general, %)",
}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as PNG (150 dpi) to `path`, creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _matrix(results: Mapping[str, Any]) -> np.ndarray:
    """R as floats, NaN where a cell was not evaluated; shape (T+1, T)."""
    return np.array([[np.nan if v is None else float(v) for v in row] for row in results["matrix"]], dtype=float)


def _short(name: str, width: int = 26) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _fmt_metric(metrics: Mapping[str, Any], key: str) -> str:
    v = metrics.get(key)
    return f"{key} {v:.1f}" if isinstance(v, (int, float)) and math.isfinite(v) else f"{key} n/a"


def learned_scores(R: np.ndarray) -> np.ndarray:
    """Each task's score right after it was trained: R[j, j] (rows 0..T), or the joint row of a
    multitask run (R has 2 rows, cl_bench/run/modes.py). Shape (T,)."""
    if R.shape[0] == 2 and R.shape[1] > 1:
        return R[1].astype(float)
    return np.array([R[j + 1, j] for j in range(R.shape[1])], dtype=float)


def relative_to_diagonal(R: np.ndarray) -> np.ndarray:
    """R[i, j] / R[j, j] * 100: each task's score as a percentage of its score right after it was
    trained (row j; the joint row of a multitask run). NaN where that is 0 or missing. Shape like R."""
    diag = learned_scores(R)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = R / diag[None, :] * 100.0
    rel[:, ~(diag > 0)] = np.nan
    return rel


def heatmap(results: Mapping[str, Any], relative: bool = False, title: str | None = None) -> Figure:
    """The results matrix R of one run: rows 'before' and 'after stage i', columns the tasks in
    training order; each cell annotated. `relative=True` shows R[i, j] as % of R[j, j] (SLICE
    Fig. 3 style: how much of what was learned on task j is kept), with the diagonal scores above
    the columns. The subtitle gives AP, FP, Fgt and, when measured, GP and IP."""
    R = _matrix(results)
    tasks = list(results["tasks"])
    T = len(tasks)
    mode = results.get("mode", "sequential")
    rows = R.shape[0]  # T + 1, or 2 for a multitask run
    values = relative_to_diagonal(R) if relative else R
    fig = _figure(2.2 + 1.15 * T, 2.0 + 0.55 * rows)
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(values)
    vmax = max(100.0, float(np.nanmax(values))) if relative and np.isfinite(values).any() else 100.0
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")  # grey: not evaluated
    image = ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
    for i in range(rows):
        for j in range(T):
            v = values[i, j]
            text = "–" if not np.isfinite(v) else (f"{v:.0f}%" if relative else f"{v:.1f}")
            light = np.isfinite(v) and v < 0.55 * vmax
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if light else "black")
        if i and mode != "multitask":
            ax.add_patch(_diagonal_box(i))
    ax.set_xticks(range(T), [f"{j + 1}. {_short(t)}" for j, t in enumerate(tasks)], rotation=30, ha="right", fontsize=8)
    after = {"multitask": ["after joint training"], "independent": [f"task {i} alone" for i in range(1, T + 1)]}
    ax.set_yticks(
        range(rows), ["before"] + after.get(mode, [f"after {i}" for i in range(1, T + 1)])[: rows - 1], fontsize=8
    )
    ax.set_xlabel("evaluated task (training order)")
    ax.set_ylabel("model trained on" if mode == "independent" else "model after stage")
    diag = learned_scores(R)
    if relative:
        top = ax.secondary_xaxis("top")
        top.set_xticks(range(T), ["–" if not np.isfinite(d) else f"{d:.1f}" for d in diag], fontsize=7)
        top.set_xlabel("score right after training the task (R[j,j], %)", fontsize=8)
    label = "% of R[j,j] (kept of what was learned)" if relative else "score (%)"
    fig.colorbar(image, ax=ax, label=label, shrink=0.9)
    metrics = results.get("metrics") or {}
    sub = "  ".join(_fmt_metric(metrics, k) for k in ("AP", "FP", "Fgt", "GP", "IP"))
    head = title or f"{results.get('sequence', '')}: results matrix R" + (
        " relative to the diagonal" if relative else ""
    )
    if relative and any(not (d > 0) for d in diag):
        sub += "   (grey: R[j,j] = 0 or missing, no % defined)"
    fig.suptitle(f"{head}\n{sub}", fontsize=9)
    return fig


def _diagonal_box(i: int):
    from matplotlib.patches import Rectangle

    return Rectangle((i - 1 - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2)


def stability_plasticity(points: Iterable[Mapping[str, Any]], title: str = "Stability–plasticity") -> Figure:
    """FP (stability, y) against AP (plasticity, x), one marker per point (SLICE Fig. 1).

    points: dicts with `label`, `AP`, `FP` (percent) and optionally `AP_std`, `FP_std` (error
    bars, e.g. over seeds). The dashed line is FP = AP (no forgetting); the shaded region above it
    is FP > AP, i.e. positive backward transfer. Points with a missing AP or FP are skipped and
    listed in the subtitle, and so are points that coincide (one hides the other)."""
    pts = list(points)
    ok = [p for p in pts if _finite(p.get("AP")) and _finite(p.get("FP"))]
    skipped = [str(p.get("label")) for p in pts if p not in ok]
    fig = _figure(7.2, 4.8)
    ax = fig.add_subplot()
    # The axes hold every marker with its error bars (a cut bar reads as a smaller spread).
    xs = [float(p["AP"]) + s * _std(p.get("AP_std")) for p in ok for s in (-1, 1)]
    ys = [float(p["FP"]) + s * _std(p.get("FP_std")) for p in ok for s in (-1, 1)]
    lo = min(xs + ys, default=0.0)
    hi = max(xs + ys, default=100.0)
    pad = max(2.0, 0.08 * (hi - lo))
    lo, hi = lo - pad, hi + pad  # not clipped at 0 or 100: a marker at FP = 0 stays whole
    ax.plot([lo, hi], [lo, hi], linestyle="--", color="grey", linewidth=1, label="FP = AP (no forgetting)")
    ax.fill_between([lo, hi], [lo, hi], [hi, hi], color="tab:green", alpha=0.08, label="FP > AP (positive BWT)")
    markers = "osD^vP*Xh<>p"
    for k, p in enumerate(ok):
        ax.errorbar(
            float(p["AP"]),
            float(p["FP"]),
            xerr=_std(p.get("AP_std")) or None,
            yerr=_std(p.get("FP_std")) or None,
            fmt=markers[k % len(markers)],
            markersize=7,
            capsize=3,
            label=str(p.get("label", k)),
        )
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("AP: plasticity (%)")
    ax.set_ylabel("FP: stability (%)")
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    same = _coinciding(ok)
    notes = [f"same point: {', '.join(g)}" for g in same] + ([f"no AP/FP: {', '.join(skipped)}"] if skipped else [])
    ax.set_title("\n".join([title] + notes), fontsize=10 if not notes else 9)
    return fig


def _std(v: Any) -> float:
    return float(v) if _finite(v) else 0.0


def _coinciding(points: list[Mapping[str, Any]]) -> list[list[str]]:
    """Labels of points drawn on top of each other (equal AP and FP to 0.01): later markers hide
    earlier ones, so the title names them."""
    groups: dict[tuple[float, float], list[str]] = {}
    for p in points:
        groups.setdefault((round(float(p["AP"]), 2), round(float(p["FP"]), 2)), []).append(str(p.get("label")))
    return [g for g in groups.values() if len(g) > 1]


def metric_curves(
    rows: Iterable[Mapping[str, Any]],
    x: str,
    metrics: Sequence[str] = ("AP", "FP", "Fgt", "GP", "IP"),
    hue: str | None = None,
    xlabel: str | None = None,
    title: str | None = None,
) -> Figure:
    """Metric against a swept knob (alpha, c, rank, ...), mean ± std over repeats (SLICE Fig. 4).

    rows: one dict per run with the knob `x`, the metric keys and optionally the `hue` key (one
    line per hue value, e.g. the method). Runs with equal (hue, x) are pooled: the marker is the
    mean, the error bar the sample standard deviation (none for a single run); n is the count.
    One panel per metric that has at least one value; x ticks are the swept values."""
    rows = list(rows)
    present = [m for m in metrics if any(_finite(r.get(m)) for r in rows)]
    if not present:
        raise ValueError(f"no run has any of the metrics {list(metrics)}")
    groups: dict[Any, dict[float, dict[str, list[float]]]] = {}
    for r in rows:
        if not _finite(r.get(x)):
            continue
        g = groups.setdefault(r.get(hue) if hue else "", {}).setdefault(float(r[x]), {})
        for m in present:
            if _finite(r.get(m)):
                g.setdefault(m, []).append(float(r[m]))
    xs_all = sorted({xv for g in groups.values() for xv in g})
    cols = min(3, len(present))
    nrows = math.ceil(len(present) / cols)
    fig = _figure(3.4 * cols + (1.6 if hue else 0), 2.9 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for k, m in enumerate(present):
        ax = axes[k // cols][k % cols]
        for label, by_x in groups.items():
            pts = [(xv, vals[m]) for xv, vals in sorted(by_x.items()) if vals.get(m)]
            if not pts:
                continue
            means = [float(np.mean(v)) for _, v in pts]
            stds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for _, v in pts]
            ax.errorbar([p[0] for p in pts], means, yerr=stds, marker="o", capsize=3, label=str(label) if hue else None)
        ax.set_xticks(xs_all, [f"{v:g}" for v in xs_all])
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(METRIC_LABELS.get(m, m), fontsize=8)
        ax.set_title(m, fontsize=9)
        ax.grid(alpha=0.3)
    for k in range(len(present), nrows * cols):
        axes[k // cols][k % cols].set_visible(False)
    if hue:
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, title=hue)
    counts = [len(v) for g in groups.values() for by_m in g.values() for v in by_m.values()]
    n = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}–{max(counts)}"
    fig.suptitle((title or f"metrics against {xlabel or x}") + f"  (mean ± std over runs, n = {n})", fontsize=10)
    return fig


def loss_curves(results: Mapping[str, Any], title: str | None = None) -> Figure:
    """Training loss of every stage on one step axis (stage boundaries dashed), from
    results.json stages[i].train.loss_curve: the mean token cross-entropy of the answer tokens
    (nats/token) per optimizer step."""
    stages = [s for s in results.get("stages", []) if (s.get("train") or {}).get("loss_curve")]
    fig = _figure(8.5, 3.6)
    ax = fig.add_subplot()
    offset = 0
    for s in stages:
        curve = s["train"]["loss_curve"]
        steps = np.arange(offset + 1, offset + len(curve) + 1)
        ax.plot(steps, curve, linewidth=1.2, label=f"stage {s['stage']}: {_short(str(s.get('task', '')), 28)}")
        if offset:
            ax.axvline(offset + 0.5, color="grey", linestyle="--", linewidth=0.8)
        offset += len(curve)
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("LM loss (nats/token)")
    ax.grid(alpha=0.3)
    if stages:
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no training steps recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title or f"{results.get('sequence', '')}: training loss per stage", fontsize=10)
    return fig


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

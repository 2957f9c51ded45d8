"""The report's figures as PNG files, from a `collect.Report`: stability-plasticity scatters, metrics
against a swept knob, mean results matrices per experiment and, per run, R heatmaps and loss
curves. The drawing itself is cl_bench/report/figures.py (matplotlib, imported only when drawn).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .collect import METRICS, Report
from .labels import block_label, is_method_key, method_label, short_names
from .tables import is_number

# Knobs swept in the papers' figures (SLICE Fig. 4: alpha; Table 1 rows: c): metric-vs-knob curves.
CURVE_KNOBS = {
    "lora.alpha": ("alpha", "LoRA α (rsLoRA: s = α/√r)"),
    "initializer.c": ("c", "SLICE c (PCGrad strength)"),
    "lora.r": ("rank", "LoRA rank r"),
}


def slug(text: str, limit: int = 90) -> str:
    """A file-name-safe form: letters, digits, '.', '-' kept; runs of anything else -> '_'."""
    s = re.sub(r"[^A-Za-z0-9.\-]+", "_", str(text)).strip("_")
    if len(s) > limit:
        s = s[: limit - 9] + "_" + hashlib.sha1(s.encode()).hexdigest()[:8]
    return s


def stem(*parts: Any) -> str:
    """File stem from parts joined by '__' (block__method__seed42)."""
    return "__".join(slug(p, 60) for p in parts)


def _run_names(runs: pd.DataFrame) -> dict[str, str]:
    """A readable unique file stem per run: <block>__<method>__seed<k> (+ its dir when taken twice)."""
    stems = {r["run"]: stem(r["block"], r["label"], f"seed{r['seed']}") for _, r in runs.iterrows()}
    counts = pd.Series(list(stems.values())).value_counts()
    return {
        run: (s if counts[s] == 1 else f"{s}__{stem(Path(run).parent.name + '_' + Path(run).name)}")
        for run, s in stems.items()
    }


def _has_matrix(res: dict) -> bool:
    m = res.get("matrix")
    return bool(m) and bool(res.get("tasks")) and any(v is not None for row in m for v in row)


def write_figures(
    report: Report, fig_dir: Path, progress: bool | None = None, per_run: bool = True
) -> dict[str, list[Path]]:
    """Every figure as PNG; returns {kind: [paths]} with kinds scatter, curves, heatmap_mean and,
    with `per_run`, heatmap_run and loss_run."""
    from tqdm.auto import tqdm

    from . import figures as plots  # matplotlib: imported only when figures are drawn

    jobs: list[tuple[str, Path, Any]] = []  # (kind, path, figure builder)
    ex = report.experiments
    for block, g in ex.groupby("block", sort=False):
        pts = [
            {
                "label": f"{r['label']} (n={int(r['n'])})",
                "AP": r["AP"],
                "FP": r["FP"],
                "AP_std": r["AP_std"] if is_number(r["AP_std"]) else None,
                "FP_std": r["FP_std"] if is_number(r["FP_std"]) else None,
            }
            for _, r in g.iterrows()
        ]
        if any(is_number(p["AP"]) and is_number(p["FP"]) for p in pts):
            jobs.append(
                (
                    "scatter",
                    fig_dir / f"AP-vs-FP__{stem(block)}.png",
                    lambda pts=pts, block=block: plots.stability_plasticity(
                        pts, title=f"{block}: stability vs plasticity (mean ± std over seeds)"
                    ),
                )
            )
    jobs += _curve_jobs(report, fig_dir)
    done = report.runs[report.runs["complete"]]
    for _, g in ex.iterrows():
        if int(g["n"]) < 2:
            continue
        members = [r for r in done[done["exp_id"] == g["exp_id"]]["results"] if _has_matrix(r)]
        mean = _mean_results(members, g)
        if mean is None:
            continue
        name = stem(g["block"], g["label"])
        head = f"{g['block']} · {g['label']}: mean R over {int(g['n'])} seeds"
        jobs.append(("heatmap_mean", fig_dir / f"R-mean__{name}.png", lambda m=mean, h=head: plots.heatmap(m, title=h)))
        jobs.append(
            (
                "heatmap_mean",
                fig_dir / f"R-mean-relative__{name}.png",
                lambda m=mean, h=head: plots.heatmap(m, relative=True, title=h + ", % of R[j,j]"),
            )
        )
    names = _run_names(report.runs)
    for _, r in report.runs.iterrows() if per_run else ():
        res = r["results"]
        if not isinstance(res, dict) or not _has_matrix(res):
            continue
        name = names[r["run"]]
        state = "" if r["state"] == "complete" else f" [{r['state']}]"
        head = f"{r['block']} · {r['label']} · seed {r['seed']}{state}"
        jobs.append(
            (
                "heatmap_run",
                fig_dir / "runs" / f"R__{name}.png",
                lambda res=res, h=head: plots.heatmap(res, title=h + ": R"),
            )
        )
        jobs.append(
            (
                "heatmap_run",
                fig_dir / "runs" / f"R-relative__{name}.png",
                lambda res=res, h=head: plots.heatmap(res, relative=True, title=h + ": R as % of R[j,j]"),
            )
        )
        if any((s.get("train") or {}).get("loss_curve") for s in res.get("stages") or []):
            jobs.append(
                (
                    "loss_run",
                    fig_dir / "runs" / f"loss__{name}.png",
                    lambda res=res, h=head: plots.loss_curves(res, title=h + ": training loss per stage"),
                )
            )
    written: dict[str, list[Path]] = {}
    for kind, path, build in tqdm(
        jobs, desc="writing figures", unit="png", disable=None if progress is None else not progress, leave=False
    ):
        written.setdefault(kind, []).append(plots.save(build(), path))
    return written


def _curve_jobs(report: Report, fig_dir: Path) -> list[tuple[str, Path, Any]]:
    """Metrics against each swept knob of CURVE_KNOBS (SLICE Fig. 4), one figure per family of
    runs that share everything but that knob (and the seed); one line per method label."""
    from . import figures as plots

    done = report.runs[report.runs["complete"]]
    short = short_names([k for kn in done["knobs"] for k in kn if is_method_key(k)])
    jobs = []
    for key, (name, axis_label) in CURVE_KNOBS.items():
        rows_by_family: dict[str, list[dict]] = {}
        for _, r in done.iterrows():
            if key not in r["knobs"]:
                continue
            try:
                x = float(r["knobs"][key])
            except ValueError:
                continue
            family = block_label(r["sequence"], r["knobs"], without=key)
            hue = method_label(r["method"], r["knobs"], short, without=key)
            rows_by_family.setdefault(family, []).append({"x": x, "method": hue, **{m: r[m] for m in METRICS}})
        for family, rows in rows_by_family.items():
            if len({row["x"] for row in rows}) < 2 or not report.table_metrics:
                continue
            hue = "method" if len({row["method"] for row in rows}) > 1 else None
            title = f"{family}: metrics vs {name}" + ("" if hue else f" ({rows[0]['method']})")
            jobs.append(
                (
                    "curves",
                    fig_dir / f"metrics-vs-{name}__{stem(family)}.png",
                    lambda rows=rows, hue=hue, title=title, axis_label=axis_label: plots.metric_curves(
                        rows, "x", metrics=report.table_metrics, hue=hue, xlabel=axis_label, title=title
                    ),
                )
            )
    return jobs


def _mean_results(members: list[dict], ex: pd.Series) -> dict | None:
    """A results-like dict whose matrix is the cell-wise mean over the runs (same tasks only)."""
    if not members or len({tuple(m["tasks"]) for m in members}) != 1:
        return None
    stack = np.array(
        [[[np.nan if v is None else float(v) for v in row] for row in m["matrix"]] for m in members], dtype=float
    )
    with np.errstate(invalid="ignore"), _quiet_nanmean():
        mean = np.nanmean(stack, axis=0)
    matrix = [[None if not np.isfinite(v) else float(v) for v in row] for row in mean]
    return {
        "sequence": members[0].get("sequence"),
        "tasks": members[0]["tasks"],
        "matrix": matrix,
        "mode": members[0].get("mode", "sequential"),
        "metrics": {m: (float(ex[m]) if is_number(ex[m]) else None) for m in METRICS},
    }


class _quiet_nanmean:
    """nanmean of an all-NaN cell (not evaluated in any run) warns; it is a grey cell, not news."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

"""What `python -m cl_bench.report --out DIR` writes, from a `report.Report`: tables (CSV numbers,
Markdown and LaTeX booktabs text), figures (cl_bench.report.figures) and one Markdown document linking them.
The file list is in README.md, section "Reports"."""
from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .collect import CURVE_KNOBS, METRICS, STATES, Report, _block_label, _is_method_key, _method_label, _natural, _short_names
from .stats import fmt_p

FORMATS = ("csv", "md", "tex")
ROLE_TEXT = {"baseline": "baseline", "delta": "Δ", "absolute": ""}


# ---- cells --------------------------------------------------------------------------------------
def _num(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating)) and math.isfinite(float(v))


def cell(mean: Any, std: Any, delta: bool = False, digits: int = 2) -> str:
    """'65.00 ± 7.07'; Δ values signed ('+1.25 ± 0.30'); no std for one seed; 'n/a' without value."""
    if not _num(mean):
        return "n/a"
    text = f"{mean:+.{digits}f}" if delta else f"{mean:.{digits}f}"
    if _num(std):
        text += f" ± {std:.{digits}f}"
    return text


def _value_cols(row: pd.Series, m: str) -> tuple[Any, Any, bool]:
    if row["role"] == "delta":
        return row[f"{m}_delta"], row[f"{m}_std"], True
    return row[m], row[f"{m}_std"], False


# ---- tables -------------------------------------------------------------------------------------
def summary_numbers(report: Report) -> pd.DataFrame:
    """summary.csv: one row per experiment, numbers only: M (mean), M_std, M_delta per metric."""
    ex = report.experiments
    cols = ["block", "label", "role", "n", "seeds", "setting"]
    for m in report.metrics:
        cols += [m, f"{m}_std", f"{m}_delta"]
    return ex[cols].rename(columns={"label": "method"}) if not ex.empty else pd.DataFrame(columns=cols)


def summary_text(report: Report) -> pd.DataFrame:
    """The summary as text cells: block, method, row kind, n, seeds, one column per metric."""
    rows = []
    for _, r in report.experiments.iterrows():
        row = {"block": r["block"], "method": r["label"], "row": ROLE_TEXT[r["role"]], "n": int(r["n"]), "seeds": r["seeds"]}
        for m in report.metrics:
            row[m] = cell(*_value_cols(r, m))
        rows.append(row)
    df = pd.DataFrame(rows, columns=["block", "method", "row", "n", "seeds", *report.metrics])
    if not report.baseline:
        df = df.drop(columns="row")
    return df


def paper_table(report: Report) -> tuple[pd.DataFrame, str]:
    """The SLICE paper's Table-1 layout: one row per method, one column group per block with the
    table metrics; baseline absolute, other rows Δ (mean ± std over seeds). Returns the text
    table (index: method; columns: (block, metric)) and its caption."""
    ex = report.experiments
    metrics = report.table_metrics
    if ex.empty or not metrics:
        return pd.DataFrame(), "no complete run has any of the table's metrics"
    ns = ex["n"].astype(int)
    common_n = int(ns.mode().iloc[0])
    blocks = sorted(ex["block"].unique(), key=_natural)
    base_labels = list(dict.fromkeys(ex.loc[ex["role"] == "baseline", "label"]))
    labels = base_labels + sorted((set(ex["label"]) - set(base_labels)), key=_natural)
    absolute_blocks = {b for b in blocks if not (ex.loc[ex["block"] == b, "role"] == "baseline").any()}
    columns = pd.MultiIndex.from_tuples([(b + (" (absolute)" if b in absolute_blocks and report.baseline else ""), m)
                                         for b in blocks for m in metrics])
    table = pd.DataFrame("–", index=pd.Index(labels, name="method"), columns=columns)
    for _, r in ex.iterrows():
        b = r["block"] + (" (absolute)" if r["block"] in absolute_blocks and report.baseline else "")
        for m in metrics:
            text = cell(*_value_cols(r, m))
            if int(r["n"]) != common_n:
                text += f" (n={int(r['n'])})"
            table.loc[r["label"], (b, m)] = text
    n_text = f"{common_n} seed{'s' * (common_n != 1)}" + (" unless marked" if (ns != common_n).any() else "")
    if report.baseline and base_labels:
        caption = (f"{'Rows' if len(base_labels) > 1 else 'Row'} {', '.join(base_labels)}: absolute mean ± std over seeds; other rows: Δ = mean(method) − "
                   f"mean(baseline) ± the method's std over seeds; n = {n_text}.")
    else:
        caption = f"Mean ± std over seeds; n = {n_text}."
    return table, caption


def paired_text(report: Report) -> pd.DataFrame:
    """paired_tests.md: the table metrics only, readable."""
    p = report.paired[report.paired["metric"].isin(report.table_metrics)]
    rows = []
    for _, r in p.iterrows():
        rows.append({"block": r["block"], "method": r["label"], "vs": r["baseline"], "metric": r["metric"], "n": int(r["n"]),
                     "mean Δ ± sd(Δ)": cell(r["mean_diff"], r["std_diff"], delta=True),
                     "t": "n/a" if not _num(r["t"]) else f"{r['t']:.2f}", "p (paired t)": fmt_p(r["p_t"]),
                     "p (sign-flip, exact)": fmt_p(r["p_signflip"]) + (f" (min {fmt_p(r['min_p_signflip'])})" if _num(r["min_p_signflip"]) else "")})
    return pd.DataFrame(rows, columns=["block", "method", "vs", "metric", "n", "mean Δ ± sd(Δ)", "t", "p (paired t)", "p (sign-flip, exact)"])


def projection_text(report: Report) -> pd.DataFrame:
    """Per experiment and stage: projection fired in k of n seeds, cos and γ mean ± std."""
    pr = report.projection
    rows = []
    for (block, label, stage, task), g in pr.groupby(["block", "label", "stage", "task"], sort=False):
        cos = pd.to_numeric(g["cos"], errors="coerce")
        gamma = pd.to_numeric(g["gamma"], errors="coerce")
        mods = pd.to_numeric(g["modules_fired"], errors="coerce")
        rows.append({"block": block, "method": label, "stage": int(stage), "task": task,
                     "fired": f"{int(g['fired'].sum())}/{len(g)} seeds",
                     "cos(G_cur, G_prev)": _spread(cos, delta=True), "γ": _spread(gamma),
                     "modules fired (mean)": f"{mods.mean():.1f}/{int(g['modules'].dropna().iloc[0])}" if mods.notna().any() and g["modules"].notna().any() else "n/a"})
    df = pd.DataFrame(rows, columns=["block", "method", "stage", "task", "fired", "cos(G_cur, G_prev)", "γ", "modules fired (mean)"])
    return df.sort_values(["block", "method", "stage"], key=lambda s: s.map(_natural)).reset_index(drop=True) if len(df) else df


def _spread(values: pd.Series, delta: bool = False) -> str:
    """mean ± std of a few per-seed values to 3 decimals (a cosine's sign and size both matter)."""
    v = values.dropna()
    if v.empty:
        return "n/a"
    return cell(v.mean(), v.std(ddof=1) if len(v) > 1 else None, delta=delta, digits=3)


def status_text(report: Report) -> pd.DataFrame:
    nc = report.not_complete
    cols = ["state", "status", "stages_done", "sequence", "label", "seed", "run"]
    df = nc.reindex(columns=cols).fillna("").rename(columns={"label": "method", "stages_done": "stages"})
    order = {s: i for i, s in enumerate(["failed", "unreadable", "missing", "interrupted", "incomplete", "pending"])}
    return df.sort_values(["state", "run"], key=lambda s: s.map(order) if s.name == "state" else s.map(_natural)).reset_index(drop=True)


def runs_csv(report: Report) -> pd.DataFrame:
    """runs.csv: one row per run, every state: labels, the shown config keys, the metrics."""
    runs = report.runs
    knob_keys = list(dict.fromkeys(k for kn in runs["knobs"] for k in kn))
    df = runs[["run", "state", "status", "stages_done", "block", "sequence", "label", "seed", *METRICS]].rename(columns={"label": "method"})
    for k in knob_keys:
        df[k] = [kn.get(k, "") for kn in runs["knobs"]]
    return df


def markdown(df: pd.DataFrame, index: bool = False) -> str:
    """GitHub Markdown via pandas (tabulate); plain text when tabulate is missing."""
    if df.empty:
        return "(none)"
    if isinstance(df.columns, pd.MultiIndex):
        df = df.copy()
        df.columns = [f"{a}: {b}" for a, b in df.columns]
    try:
        import tabulate  # noqa: F401  (pandas.to_markdown needs it)
    except ImportError:
        return df.to_string(index=index)
    return df.to_markdown(index=index, disable_numparse=True)


_TEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}", "Δ": r"$\Delta$",
                "±": r"$\pm$", "γ": r"$\gamma$", "α": r"$\alpha$", "−": "-", "–": "--"}


def tex_escape(s: Any) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(s))


def latex(df: pd.DataFrame, caption: str, label: str, index: bool = False) -> str:
    """A booktabs table (\\toprule/\\midrule/\\bottomrule; needs \\usepackage{booktabs}) through
    pandas' Styler; every cell and header escaped (± -> $\\pm$, Δ -> $\\Delta$, _ -> \\_)."""
    if df.empty:
        return f"% {tex_escape(caption)}: no rows\n"
    sty = df.style.format_index(tex_escape, axis=1).format(tex_escape)
    sty = sty.format_index(tex_escape, axis=0).hide(axis="index", names=True) if index else sty.hide(axis="index")
    return sty.to_latex(hrules=True, multicol_align="c", caption=tex_escape(caption), label=label,
                        position_float="centering", column_format=("l" * (df.index.nlevels if index else 0)) + "l" * len(df.columns)) + "\n"


def write_tables(report: Report, out: Path, formats: tuple[str, ...]) -> list[Path]:
    """runs.csv always; summary, table_paper, paired_tests (with a baseline) and projection (when
    recorded) in each of `formats`."""
    out.mkdir(parents=True, exist_ok=True)
    files = []

    def put(name: str, text: str) -> None:
        (out / name).write_text(text)
        files.append(out / name)

    runs_csv(report).to_csv(out / "runs.csv", index=False)
    files.append(out / "runs.csv")
    paper, caption = paper_table(report)
    tables = {  # name: (numbers for CSV, text for Markdown and TeX, caption, index?)
        "summary": (summary_numbers(report), summary_text(report),
                    "All metrics per experiment: mean ± std over seeds" + (f"; Δ rows vs {report.baseline}" if report.baseline else ""), False),
        "table_paper": (paper.reset_index() if len(paper) else paper, paper, caption, True),
        "paired_tests": (report.paired, paired_text(report),
                         "Paired tests over seeds, method vs baseline (two-sided)", False),
        "projection": (report.projection.drop(columns=["exp_id"]), projection_text(report),
                       "Gradient projection at each stage's init (fired in k of n seeds; cos and gamma mean ± std)", False),
    }
    for name, (numbers, text, cap, index) in tables.items():
        if name == "paired_tests" and not report.baseline:
            continue
        if name == "projection" and report.projection.empty:
            continue
        if "csv" in formats:
            numbers.to_csv(out / f"{name}.csv", index=False)
            files.append(out / f"{name}.csv")
        if "md" in formats:
            put(f"{name}.md", f"{cap}\n\n{markdown(text, index=index)}\n")
        if "tex" in formats:
            put(f"{name}.tex", latex(text, cap, f"tab:{name}", index=index))
    return files


# ---- figures ------------------------------------------------------------------------------------
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
    return {run: (s if counts[s] == 1 else f"{s}__{stem(Path(run).parent.name + '_' + Path(run).name)}") for run, s in stems.items()}


def _has_matrix(res: dict) -> bool:
    m = res.get("matrix")
    return bool(m) and bool(res.get("tasks")) and any(v is not None for row in m for v in row)


def write_figures(report: Report, fig_dir: Path, progress: bool | None = None, per_run: bool = True) -> dict[str, list[Path]]:
    """Every figure as PNG; returns {kind: [paths]} with kinds scatter, curves, heatmap_mean and,
    with `per_run`, heatmap_run and loss_run."""
    from tqdm.auto import tqdm

    from . import figures as plots  # matplotlib: imported only when figures are drawn

    jobs: list[tuple[str, Path, Any]] = []  # (kind, path, figure builder)
    ex = report.experiments
    for block, g in ex.groupby("block", sort=False):
        pts = [{"label": f"{r['label']} (n={int(r['n'])})", "AP": r["AP"], "FP": r["FP"],
                "AP_std": r["AP_std"] if _num(r["AP_std"]) else None, "FP_std": r["FP_std"] if _num(r["FP_std"]) else None}
               for _, r in g.iterrows()]
        if any(_num(p["AP"]) and _num(p["FP"]) for p in pts):
            jobs.append(("scatter", fig_dir / f"AP-vs-FP__{stem(block)}.png",
                         lambda pts=pts, block=block: plots.stability_plasticity(pts, title=f"{block}: stability vs plasticity (mean ± std over seeds)")))
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
        jobs.append(("heatmap_mean", fig_dir / f"R-mean-relative__{name}.png",
                     lambda m=mean, h=head: plots.heatmap(m, relative=True, title=h + ", % of R[j,j]")))
    names = _run_names(report.runs)
    for _, r in report.runs.iterrows() if per_run else ():
        res = r["results"]
        if not isinstance(res, dict) or not _has_matrix(res):
            continue
        name = names[r["run"]]
        state = "" if r["state"] == "complete" else f" [{r['state']}]"
        head = f"{r['block']} · {r['label']} · seed {r['seed']}{state}"
        jobs.append(("heatmap_run", fig_dir / "runs" / f"R__{name}.png", lambda res=res, h=head: plots.heatmap(res, title=h + ": R")))
        jobs.append(("heatmap_run", fig_dir / "runs" / f"R-relative__{name}.png",
                     lambda res=res, h=head: plots.heatmap(res, relative=True, title=h + ": R as % of R[j,j]")))
        if any((s.get("train") or {}).get("loss_curve") for s in res.get("stages") or []):
            jobs.append(("loss_run", fig_dir / "runs" / f"loss__{name}.png",
                         lambda res=res, h=head: plots.loss_curves(res, title=h + ": training loss per stage")))
    written: dict[str, list[Path]] = {}
    for kind, path, build in tqdm(jobs, desc="writing figures", unit="png", disable=None if progress is None else not progress, leave=False):
        written.setdefault(kind, []).append(plots.save(build(), path))
    return written


def _curve_jobs(report: Report, fig_dir: Path) -> list[tuple[str, Path, Any]]:
    """Metrics against each swept knob of CURVE_KNOBS (SLICE Fig. 4), one figure per family of
    runs that share everything but that knob (and the seed); one line per method label."""
    from . import figures as plots
    done = report.runs[report.runs["complete"]]
    short = _short_names([k for kn in done["knobs"] for k in kn if _is_method_key(k)])
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
            family = _block_label(r["sequence"], r["knobs"], without=key)
            hue = _method_label(r["method"], r["knobs"], short, without=key)
            rows_by_family.setdefault(family, []).append({"x": x, "method": hue, **{m: r[m] for m in METRICS}})
        for family, rows in rows_by_family.items():
            if len({row["x"] for row in rows}) < 2 or not report.table_metrics:
                continue
            hue = "method" if len({row["method"] for row in rows}) > 1 else None
            title = f"{family}: metrics vs {name}" + ("" if hue else f" ({rows[0]['method']})")
            jobs.append(("curves", fig_dir / f"metrics-vs-{name}__{stem(family)}.png",
                         lambda rows=rows, hue=hue, title=title, axis_label=axis_label: plots.metric_curves(
                             rows, "x", metrics=report.table_metrics, hue=hue, xlabel=axis_label, title=title)))
    return jobs


def _mean_results(members: list[dict], ex: pd.Series) -> dict | None:
    """A results-like dict whose matrix is the cell-wise mean over the runs (same tasks only)."""
    if not members or len({tuple(m["tasks"]) for m in members}) != 1:
        return None
    stack = np.array([[[np.nan if v is None else float(v) for v in row] for row in m["matrix"]] for m in members], dtype=float)
    with np.errstate(invalid="ignore"), _quiet_nanmean():
        mean = np.nanmean(stack, axis=0)
    matrix = [[None if not np.isfinite(v) else float(v) for v in row] for row in mean]
    return {"sequence": members[0].get("sequence"), "tasks": members[0]["tasks"], "matrix": matrix, "mode": members[0].get("mode", "sequential"),
            "metrics": {m: (float(ex[m]) if _num(ex[m]) else None) for m in METRICS}}


class _quiet_nanmean:
    """nanmean of an all-NaN cell (not evaluated in any run) warns; it is a grey cell, not news."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


# ---- the reading: computed sentences, never typed --------------------------------------------------
# +1: higher is better; -1: lower is better (Fgt, FR: forgetting).
BETTER = {"AP": 1, "FP": 1, "Fgt": -1, "BWT": 1, "FWT": 1, "FR": -1, "Acc": 1, "AAA": 1, "GP": 1, "IP": 1, "FWT_scratch": 1}
READING_METRICS = ("FP", "Fgt", "AP")  # the claim: stability (FP), forgetting, plasticity (AP)
ALPHA = 0.05
# Rows of the run modes (cl_bench/modes.py): read as reference points, not as methods that help or hurt.
REFERENCE_ROWS = {"Multitask": "the joint-training upper bound", "Independent": "each task from the base model"}


def verdict(delta: Any, p: Any, metric: str, alpha: float = ALPHA) -> str:
    """'better' / 'worse' when the paired t-test gives p < alpha (the sign of Δ and the metric's
    direction decide which), 'within seed noise' otherwise, 'n/a' without a test."""
    if not _num(delta) or not _num(p):
        return "n/a"
    if p >= alpha:
        return "within seed noise"
    return "better" if delta * BETTER[metric] > 0 else "worse"


def reading_lines(report: Report, alpha: float = ALPHA) -> list[str]:
    """The reading of the results as Markdown bullet lines, each number taken from the report:
    per block, every row against the baseline on FP, Fgt and AP (Δ ± the method's std, the
    baseline's seed std as the noise scale, the paired t-test and sign-flip p), a verdict per
    row, and for rows with a gradient projection whether it fired at each stage (cos, γ)."""
    ex, paired = report.experiments, report.paired
    if not report.baseline or ex.empty or not (ex["role"] == "baseline").any():
        return ["No baseline given (--baseline METHOD): no differences to read."]
    metrics = [m for m in READING_METRICS if m in report.metrics]
    proj = projection_text(report)
    lines = [f"Each method against {report.baseline}, per block, on {', '.join(metrics)}: Δ = mean(method) − mean(baseline) "
             f"± the method's std over seeds; noise = the baseline's std over seeds; p = paired t-test over seeds "
             f"(sign-flip p in brackets); a difference counts as better or worse only at p < {alpha:g}."]
    for block, g in ex.groupby("block", sort=False):
        base = g[g["role"] == "baseline"]
        if base.empty:
            continue
        b = base.iloc[0]
        lines += ["", f"**{block}** — {b['label']} (n={int(b['n'])}): "
                  + ", ".join(f"{m} {cell(b[m], b[f'{m}_std'])}" for m in metrics)]
        for _, r in g[g["role"] == "delta"].iterrows():
            parts, verdicts = [], []
            for m in metrics:
                t = paired[(paired["block"] == block) & (paired["label"] == r["label"]) & (paired["metric"] == m)]
                p_t, p_flip = (t.iloc[0]["p_t"], t.iloc[0]["p_signflip"]) if len(t) else (np.nan, np.nan)
                v = verdict(r[f"{m}_delta"], p_t, m, alpha)
                verdicts.append(v)
                noise = b[f"{m}_std"]
                size = ""
                if _num(r[f"{m}_delta"]) and _num(noise) and noise > 0:
                    size = f", {abs(r[f'{m}_delta']) / noise:.1f}× noise"
                parts.append(f"Δ{m} {cell(r[f'{m}_delta'], r[f'{m}_std'], delta=True)} (p {fmt_p(p_t)} [{fmt_p(p_flip)}]{size}; {v})")
            overall = ("helps" if "better" in verdicts and "worse" not in verdicts else
                       "hurts" if "worse" in verdicts and "better" not in verdicts else
                       "mixed" if "better" in verdicts else "no difference beyond seed noise")
            reference = REFERENCE_ROWS.get(str(r["method"]).split("+")[0])
            if reference:  # a reference point, not a method: where the baseline stands against it
                overall = f"reference, {reference}"
            lines.append(f"- {r['label']} (n={int(r['n'])}): **{overall}** — " + "; ".join(parts))
            stages = proj[(proj["block"] == block) & (proj["method"] == r["label"])] if len(proj) else proj
            if len(stages):
                fired = [f"stage {int(s['stage'])} ({s['task']}): fired {s['fired']}, cos {s['cos(G_cur, G_prev)']}, γ {s['γ']}"
                         for _, s in stages.iterrows()]
                never = all(str(s["fired"]).startswith("0/") for _, s in stages.iterrows())
                lines.append("  - projection: " + "; ".join(fired)
                             + (" — it never fired, so this row trained exactly as LoRA-GA would" if never else ""))
    return lines


# ---- the document and the console ---------------------------------------------------------------
def _img(path: Path, doc_dir: Path, alt: str) -> str:
    return f"![{alt}]({Path(os.path.relpath(path, doc_dir)).as_posix()})"


def write_document(report: Report, path: Path, figures: dict[str, list[Path]], title: str | None = None,
                   notes: str | None = None, command: str | None = None) -> Path:
    """One Markdown file: the paper-layout table, all metrics, paired tests, projection, figures,
    runs that are not complete, warnings. Links are relative to the document's folder."""
    path = Path(path)
    doc_dir = path.parent
    doc_dir.mkdir(parents=True, exist_ok=True)
    runs = report.runs
    n_complete = int(runs["complete"].sum())
    lines = [f"# {title or 'cl_bench report'}", ""]
    missing = len(runs) - n_complete
    lines += [f"Generated by `{command}`" if command else "Generated by `python -m cl_bench.report`",
              f"from {len(runs)} runs ({n_complete} complete" + (f", {missing} not: see [Runs not complete](#runs-not-complete))." if missing else ")."),
              "Scores in percent; mean ± sample std over distinct seeds (n); metric definitions in shared/DESIGN.md §4.", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    paper, caption = paper_table(report)
    lines += ["## Main table", "", caption, "", markdown(paper, index=True), ""]
    if report.baseline:
        lines += ["## Reading (computed from the runs)", ""] + reading_lines(report) + [""]
    lines += ["## All metrics", "", markdown(summary_text(report)), ""]
    if report.baseline:
        lines += ["## Paired tests over seeds", "",
                  f"Each method against {report.baseline} on the seeds both ran: mean and sd of the per-seed differences, the paired "
                  "t-test and the exact sign-flip test (two-sided; the sign-flip test cannot go below its min p at this n). "
                  "Every metric is in paired_tests.csv.", "", markdown(paired_text(report)), ""]
    if not report.projection.empty:
        lines += ["## Gradient projection per stage", "",
                  "Whether SLICE's projection fired at each stage's init, in how many seeds, with the global cosine between the "
                  "current and the previous tasks' gradients and γ (cl_bench/initializers/gradient.py).", "",
                  markdown(projection_text(report)), ""]
    sections = [("scatter", "Stability vs plasticity (FP against AP)"), ("curves", "Metrics against a swept knob"),
                ("heatmap_mean", "Results matrices, mean over seeds")]
    for kind, head in sections:
        if figures.get(kind):
            lines += [f"## {head}", ""] + [_img(p, doc_dir, p.stem) for p in figures[kind]] + [""]
    per_run = sum(len(figures.get(k, [])) for k in ("heatmap_run", "loss_run"))
    if per_run:
        folder = Path(os.path.relpath(figures.get("heatmap_run", figures.get("loss_run"))[0].parent, doc_dir)).as_posix()
        lines += ["## Per run", "", f"{per_run} figures in [{folder}/]({folder}/): `R__*` (results matrix), `R-relative__*` "
                  "(as % of the diagonal), `loss__*` (training loss per stage); names are <block>__<method>__seed<k>.", ""]
    lines += ["## Runs not complete", "", markdown(status_text(report)), ""]
    if report.notes:
        lines += ["## Warnings", ""] + [f"- {n}" for n in report.notes] + [""]
    path.write_text("\n".join(lines))
    return path


def console_text(report: Report) -> str:
    lines = []
    if report.experiments.empty:
        lines.append("(no complete run)")
    else:
        lines.append(markdown(summary_text(report)))
    ex = report.experiments
    if not report.baseline and not ex.empty and ex["method"].str.lower().eq("vanilla").any():
        lines.append("(absolute values; --baseline vanilla shows the other rows as Δ vs Vanilla)")
    if report.baseline and not report.paired.empty:
        sig = report.paired[(report.paired["p_t"] < 0.05) & report.paired["metric"].isin(report.table_metrics)]
        lines.append(f"paired tests vs {report.baseline}: {len(sig)} of {int(report.paired['metric'].isin(report.table_metrics).sum())} "
                     f"differences in {','.join(report.table_metrics)} have p < 0.05 (paired t); see paired_tests.md")
    nc = report.not_complete
    if len(nc):
        counts = nc["state"].value_counts()
        text = ", ".join(f"{counts[s]} {s}" for s in STATES if s in counts)
        lines.append(f"{len(nc)} run(s) not complete, left out of the numbers ({text}):")
        for _, r in status_text(report).iterrows():
            lines.append(f"  {r['state']:<11} {r['run']}: {r['status']}")
    lines += report.notes
    if report.files:
        root = os.path.commonpath([str(p) for p in report.files])
        doc = [p for p in report.files if p.suffix == ".md" and p.name not in {f"{n}.md" for n in ("summary", "table_paper", "paired_tests", "projection")}]
        lines.append(f"wrote {len(report.files)} files under {root}" + (f"; the document: {doc[-1]}" if doc else ""))
    return "\n".join(lines)

"""The report's tables from a `collect.Report`: text cells (mean ± std, Δ), the summary, the SLICE
paper's Table-1 layout, paired tests, projection and run status tables, and their CSV / Markdown /
LaTeX booktabs files (the file list is in README.md, section "Reports").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .collect import METRICS, Report
from .labels import natural_key
from .paper_names import METRICS_AS
from .stats import fmt_p

FORMATS = ("csv", "md", "tex")
ROLE_TEXT = {"baseline": "baseline", "delta": "Δ", "absolute": ""}


# ---- cells --------------------------------------------------------------------------------------
def is_number(v: Any) -> bool:
    """A finite int or float (NaN, inf, None and text are not)."""
    return isinstance(v, (int, float, np.floating)) and math.isfinite(float(v))


def cell(mean: Any, std: Any, delta: bool = False, digits: int = 2) -> str:
    """'65.00 ± 7.07'; Δ values signed ('+1.25 ± 0.30'); no std for one seed; 'n/a' without value."""
    if not is_number(mean):
        return "n/a"
    text = f"{mean:+.{digits}f}" if delta else f"{mean:.{digits}f}"
    if is_number(std):
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
        row = {
            "block": r["block"],
            "method": r["label"],
            "row": ROLE_TEXT[r["role"]],
            "n": int(r["n"]),
            "seeds": r["seeds"],
        }
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
    blocks = sorted(ex["block"].unique(), key=natural_key)
    base_labels = list(dict.fromkeys(ex.loc[ex["role"] == "baseline", "label"]))
    labels = base_labels + sorted((set(ex["label"]) - set(base_labels)), key=natural_key)
    absolute_blocks = {b for b in blocks if not (ex.loc[ex["block"] == b, "role"] == "baseline").any()}
    columns = pd.MultiIndex.from_tuples(
        [(b + (" (absolute)" if b in absolute_blocks and report.baseline else ""), m) for b in blocks for m in metrics]
    )
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
        caption = (
            f"{'Rows' if len(base_labels) > 1 else 'Row'} {', '.join(base_labels)}: absolute mean ± std over seeds; other rows: Δ = mean(method) − "
            f"mean(baseline) ± the method's std over seeds; n = {n_text}."
        )
    else:
        caption = f"Mean ± std over seeds; n = {n_text}."
    return table, caption


def named_columns(paper: str) -> str:
    """'AP = our FP, FT = our FR': how a paper's headers map to ours (METRICS_AS)."""
    return ", ".join(f"{theirs} = our {ours}" for theirs, ours in METRICS_AS[paper].items())


def named_tables(report: Report) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The --metrics-as table: one row per experiment (block, method, n), one column per metric of
    the paper, headed by the paper's name for it (METRICS_AS[report.metrics_as]) and computed from
    the same matrices as ours. Returns (numbers for CSV: mean, std and Δ per column; text cells,
    Δ rows vs the baseline when there is one; caption)."""
    names = METRICS_AS[report.metrics_as]
    ex = report.experiments
    text_rows, number_rows = [], []
    for _, r in ex.iterrows():
        head = {"block": r["block"], "method": r["label"], "n": int(r["n"])}
        if report.baseline:
            head["row"] = ROLE_TEXT[r["role"]]
        text_rows.append({**head, **{theirs: cell(*_value_cols(r, ours)) for theirs, ours in names.items()}})
        numbers = dict(head)
        for theirs, ours in names.items():
            numbers.update({theirs: r[ours], f"{theirs}_std": r[f"{ours}_std"], f"{theirs}_delta": r[f"{ours}_delta"]})
        number_rows.append(numbers)
    head_cols = ["block", "method", "n"] + (["row"] if report.baseline else [])
    text = pd.DataFrame(text_rows, columns=head_cols + list(names))
    number_cols = head_cols + [f"{t}{suffix}" for t in names for suffix in ("", "_std", "_delta")]
    caption = (
        f"Metrics under the names of {report.metrics_as} ({named_columns(report.metrics_as)}): mean ± std over seeds"
        + (f"; Δ rows vs {report.baseline}" if report.baseline else "")
    )
    return pd.DataFrame(number_rows, columns=number_cols), text, caption


def paired_text(report: Report) -> pd.DataFrame:
    """paired_tests.md: the table metrics only, readable."""
    p = report.paired[report.paired["metric"].isin(report.table_metrics)]
    rows = []
    for _, r in p.iterrows():
        rows.append(
            {
                "block": r["block"],
                "method": r["label"],
                "vs": r["baseline"],
                "metric": r["metric"],
                "n": int(r["n"]),
                "mean Δ ± sd(Δ)": cell(r["mean_diff"], r["std_diff"], delta=True),
                "t": "n/a" if not is_number(r["t"]) else f"{r['t']:.2f}",
                "p (paired t)": fmt_p(r["p_t"]),
                "p (sign-flip, exact)": fmt_p(r["p_signflip"])
                + (f" (min {fmt_p(r['min_p_signflip'])})" if is_number(r["min_p_signflip"]) else ""),
            }
        )
    return pd.DataFrame(
        rows,
        columns=["block", "method", "vs", "metric", "n", "mean Δ ± sd(Δ)", "t", "p (paired t)", "p (sign-flip, exact)"],
    )


def projection_text(report: Report) -> pd.DataFrame:
    """Per experiment and stage: projection fired in k of n seeds, cos and γ mean ± std."""
    pr = report.projection
    rows = []
    for (block, label, stage, task), g in pr.groupby(["block", "label", "stage", "task"], sort=False):
        cos = pd.to_numeric(g["cos"], errors="coerce")
        gamma = pd.to_numeric(g["gamma"], errors="coerce")
        mods = pd.to_numeric(g["modules_fired"], errors="coerce")
        rows.append(
            {
                "block": block,
                "method": label,
                "stage": int(stage),
                "task": task,
                "fired": f"{int(g['fired'].sum())}/{len(g)} seeds",
                "cos(G_cur, G_prev)": _spread(cos, delta=True),
                "γ": _spread(gamma),
                "modules fired (mean)": f"{mods.mean():.1f}/{int(g['modules'].dropna().iloc[0])}"
                if mods.notna().any() and g["modules"].notna().any()
                else "n/a",
            }
        )
    df = pd.DataFrame(
        rows, columns=["block", "method", "stage", "task", "fired", "cos(G_cur, G_prev)", "γ", "modules fired (mean)"]
    )
    return (
        df.sort_values(["block", "method", "stage"], key=lambda s: s.map(natural_key)).reset_index(drop=True)
        if len(df)
        else df
    )


def _spread(values: pd.Series, delta: bool = False) -> str:
    """mean ± std of a few per-seed values to 3 decimals (a cosine's sign and size both matter)."""
    v = values.dropna()
    if v.empty:
        return "n/a"
    return cell(v.mean(), v.std(ddof=1) if len(v) > 1 else None, delta=delta, digits=3)


def status_text(report: Report) -> pd.DataFrame:
    """The runs left out of the numbers: state, status, stages done, sequence, method, seed, run dir."""
    nc = report.not_complete
    cols = ["state", "status", "stages_done", "sequence", "label", "seed", "run"]
    df = nc.reindex(columns=cols).fillna("").rename(columns={"label": "method", "stages_done": "stages"})
    order = {s: i for i, s in enumerate(["failed", "unreadable", "missing", "interrupted", "incomplete", "pending"])}
    return df.sort_values(
        ["state", "run"], key=lambda s: s.map(order) if s.name == "state" else s.map(natural_key)
    ).reset_index(drop=True)


def runs_csv(report: Report) -> pd.DataFrame:
    """runs.csv: one row per run, every state: labels, the shown config keys, the metrics."""
    runs = report.runs
    knob_keys = list(dict.fromkeys(k for kn in runs["knobs"] for k in kn))
    df = runs[["run", "state", "status", "stages_done", "block", "sequence", "label", "seed", *METRICS]].rename(
        columns={"label": "method"}
    )
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


_TEX_SPECIAL = {
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
    "Δ": r"$\Delta$",
    "±": r"$\pm$",
    "γ": r"$\gamma$",
    "α": r"$\alpha$",
    "−": "-",
    "–": "--",
}


def tex_escape(s: Any) -> str:
    """`s` as LaTeX text: special characters escaped, Δ ± γ α in math mode."""
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(s))


def latex(df: pd.DataFrame, caption: str, label: str, index: bool = False) -> str:
    """A booktabs table (\\toprule/\\midrule/\\bottomrule; needs \\usepackage{booktabs}) through
    pandas' Styler; every cell and header escaped (± -> $\\pm$, Δ -> $\\Delta$, _ -> \\_)."""
    if df.empty:
        return f"% {tex_escape(caption)}: no rows\n"
    sty = df.style.format_index(tex_escape, axis=1).format(tex_escape)
    sty = sty.format_index(tex_escape, axis=0).hide(axis="index", names=True) if index else sty.hide(axis="index")
    return (
        sty.to_latex(
            hrules=True,
            multicol_align="c",
            caption=tex_escape(caption),
            label=label,
            position_float="centering",
            column_format=("l" * (df.index.nlevels if index else 0)) + "l" * len(df.columns),
        )
        + "\n"
    )


def write_tables(report: Report, out: Path, formats: tuple[str, ...]) -> list[Path]:
    """runs.csv always; summary, table_paper, paired_tests (with a baseline), projection (when
    recorded) and metrics_as_<paper> (with --metrics-as) in each of `formats`."""
    out.mkdir(parents=True, exist_ok=True)
    files = []

    def put(name: str, text: str) -> None:
        (out / name).write_text(text)
        files.append(out / name)

    runs_csv(report).to_csv(out / "runs.csv", index=False)
    files.append(out / "runs.csv")
    paper, caption = paper_table(report)
    tables = {  # name: (numbers for CSV, text for Markdown and TeX, caption, index?)
        "summary": (
            summary_numbers(report),
            summary_text(report),
            "All metrics per experiment: mean ± std over seeds"
            + (f"; Δ rows vs {report.baseline}" if report.baseline else ""),
            False,
        ),
        "table_paper": (paper.reset_index() if len(paper) else paper, paper, caption, True),
        "paired_tests": (
            report.paired,
            paired_text(report),
            "Paired tests over seeds, method vs baseline (two-sided)",
            False,
        ),
        "projection": (
            report.projection.drop(columns=["exp_id"]),
            projection_text(report),
            "Gradient projection at each stage's init (fired in k of n seeds; cos and gamma mean ± std)",
            False,
        ),
    }
    if report.metrics_as:
        numbers, text, cap = named_tables(report)
        tables[f"metrics_as_{report.metrics_as}"] = (numbers, text, cap, False)
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

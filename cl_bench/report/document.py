"""The report's Markdown document (main table, the computed reading, all metrics, paired tests,
projection, figures, runs not complete, warnings) and the text the command prints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .collect import STATES, Report
from .stats import fmt_p
from .tables import (
    cell,
    is_number,
    markdown,
    named_tables,
    paired_text,
    paper_table,
    projection_text,
    status_text,
    summary_text,
)

# ---- the reading: computed sentences, never typed --------------------------------------------------
# +1: higher is better; -1: lower is better (Fgt, FR: forgetting).
BETTER = {
    "AP": 1,
    "FP": 1,
    "Fgt": -1,
    "BWT": 1,
    "FWT": 1,
    "FR": -1,
    "Acc": 1,
    "AAA": 1,
    "GP": 1,
    "IP": 1,
    "FWT_scratch": 1,
}
READING_METRICS = ("FP", "Fgt", "AP")  # the claim: stability (FP), forgetting, plasticity (AP)
ALPHA = 0.05
# Rows of the run modes (cl_bench/run/modes.py): read as reference points, not as methods that help or hurt.
REFERENCE_ROWS = {"Multitask": "the joint-training upper bound", "Independent": "each task from the base model"}


def verdict(delta: Any, p: Any, metric: str, alpha: float = ALPHA) -> str:
    """'better' / 'worse' when the paired t-test gives p < alpha (the sign of Δ and the metric's
    direction decide which), 'within seed noise' otherwise, 'n/a' without a test."""
    if not is_number(delta) or not is_number(p):
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
    lines = [
        f"Each method against {report.baseline}, per block, on {', '.join(metrics)}: Δ = mean(method) − mean(baseline) "
        f"± the method's std over seeds; noise = the baseline's std over seeds; p = paired t-test over seeds "
        f"(sign-flip p in brackets); a difference counts as better or worse only at p < {alpha:g}."
    ]
    for block, g in ex.groupby("block", sort=False):
        base = g[g["role"] == "baseline"]
        if base.empty:
            continue
        b = base.iloc[0]
        lines += [
            "",
            f"**{block}** — {b['label']} (n={int(b['n'])}): "
            + ", ".join(f"{m} {cell(b[m], b[f'{m}_std'])}" for m in metrics),
        ]
        for _, r in g[g["role"] == "delta"].iterrows():
            parts, verdicts = [], []
            for m in metrics:
                t = paired[(paired["block"] == block) & (paired["label"] == r["label"]) & (paired["metric"] == m)]
                p_t, p_flip = (t.iloc[0]["p_t"], t.iloc[0]["p_signflip"]) if len(t) else (np.nan, np.nan)
                v = verdict(r[f"{m}_delta"], p_t, m, alpha)
                verdicts.append(v)
                noise = b[f"{m}_std"]
                size = ""
                if is_number(r[f"{m}_delta"]) and is_number(noise) and noise > 0:
                    size = f", {abs(r[f'{m}_delta']) / noise:.1f}× noise"
                parts.append(
                    f"Δ{m} {cell(r[f'{m}_delta'], r[f'{m}_std'], delta=True)} (p {fmt_p(p_t)} [{fmt_p(p_flip)}]{size}; {v})"
                )
            overall = (
                "helps"
                if "better" in verdicts and "worse" not in verdicts
                else "hurts"
                if "worse" in verdicts and "better" not in verdicts
                else "mixed"
                if "better" in verdicts
                else "no difference beyond seed noise"
            )
            reference = REFERENCE_ROWS.get(str(r["method"]).split("+")[0])
            if reference:  # a reference point, not a method: where the baseline stands against it
                overall = f"reference, {reference}"
            lines.append(f"- {r['label']} (n={int(r['n'])}): **{overall}** — " + "; ".join(parts))
            stages = proj[(proj["block"] == block) & (proj["method"] == r["label"])] if len(proj) else proj
            if len(stages):
                fired = [
                    f"stage {int(s['stage'])} ({s['task']}): fired {s['fired']}, cos {s['cos(G_cur, G_prev)']}, γ {s['γ']}"
                    for _, s in stages.iterrows()
                ]
                never = all(str(s["fired"]).startswith("0/") for _, s in stages.iterrows())
                lines.append(
                    "  - projection: "
                    + "; ".join(fired)
                    + (" — it never fired, so this row trained exactly as LoRA-GA would" if never else "")
                )
    return lines


# ---- the document and the console ---------------------------------------------------------------
def _img(path: Path, doc_dir: Path, alt: str) -> str:
    return f"![{alt}]({Path(os.path.relpath(path, doc_dir)).as_posix()})"


def write_document(
    report: Report,
    path: Path,
    figures: dict[str, list[Path]],
    title: str | None = None,
    notes: str | None = None,
    command: str | None = None,
) -> Path:
    """One Markdown file: the paper-layout table, all metrics, paired tests, projection, figures,
    runs that are not complete, warnings. Links are relative to the document's folder."""
    path = Path(path)
    doc_dir = path.parent
    doc_dir.mkdir(parents=True, exist_ok=True)
    runs = report.runs
    n_complete = int(runs["complete"].sum())
    lines = [f"# {title or 'cl_bench report'}", ""]
    missing = len(runs) - n_complete
    lines += [
        f"Generated by `{command}`" if command else "Generated by `python -m cl_bench.report`",
        f"from {len(runs)} runs ({n_complete} complete"
        + (f", {missing} not: see [Runs not complete](#runs-not-complete))." if missing else ")."),
        "Scores in percent; mean ± sample std over distinct seeds (n); metric definitions in cl_bench's docs/design.md §7.",
        "",
    ]
    if notes:
        lines += [notes.rstrip(), ""]
    paper, caption = paper_table(report)
    lines += ["## Main table", "", caption, "", markdown(paper, index=True), ""]
    if report.baseline:
        lines += ["## Reading (computed from the runs)", ""] + reading_lines(report) + [""]
    lines += ["## All metrics", "", markdown(summary_text(report)), ""]
    if report.metrics_as:
        _, text, caption = named_tables(report)
        lines += [f"## Under {report.metrics_as}'s names", "", caption + ".", "", markdown(text), ""]
    if report.baseline:
        lines += [
            "## Paired tests over seeds",
            "",
            f"Each method against {report.baseline} on the seeds both ran: mean and sd of the per-seed differences, the paired "
            "t-test and the exact sign-flip test (two-sided; the sign-flip test cannot go below its min p at this n). "
            "Every metric is in paired_tests.csv.",
            "",
            markdown(paired_text(report)),
            "",
        ]
    if not report.projection.empty:
        lines += [
            "## Gradient projection per stage",
            "",
            "Whether SLICE's projection fired at each stage's init, in how many seeds, with the global cosine between the "
            "current and the previous tasks' gradients and γ (cl_bench/initializers/gradient.py).",
            "",
            markdown(projection_text(report)),
            "",
        ]
    sections = [
        ("scatter", "Stability vs plasticity (FP against AP)"),
        ("curves", "Metrics against a swept knob"),
        ("heatmap_mean", "Results matrices, mean over seeds"),
    ]
    for kind, head in sections:
        if figures.get(kind):
            lines += [f"## {head}", ""] + [_img(p, doc_dir, p.stem) for p in figures[kind]] + [""]
    per_run = sum(len(figures.get(k, [])) for k in ("heatmap_run", "loss_run"))
    if per_run:
        folder = Path(
            os.path.relpath(figures.get("heatmap_run", figures.get("loss_run"))[0].parent, doc_dir)
        ).as_posix()
        lines += [
            "## Per run",
            "",
            f"{per_run} figures in [{folder}/]({folder}/): `R__*` (results matrix), `R-relative__*` "
            "(as % of the diagonal), `loss__*` (training loss per stage); names are <block>__<method>__seed<k>.",
            "",
        ]
    lines += ["## Runs not complete", "", markdown(status_text(report)), ""]
    if report.notes:
        lines += ["## Warnings", ""] + [f"- {n}" for n in report.notes] + [""]
    path.write_text("\n".join(lines))
    return path


def console_text(report: Report) -> str:
    """What the command prints: the summary table, the paired-test count, the runs left out, the
    warnings and the files written."""
    lines = []
    if report.experiments.empty:
        lines.append("(no complete run)")
    elif report.metrics_as:  # the paper's names instead of ours
        _, text, caption = named_tables(report)
        lines += [caption, markdown(text)]
    else:
        lines.append(markdown(summary_text(report)))
    ex = report.experiments
    if not report.baseline and not ex.empty and ex["method"].str.lower().eq("vanilla").any():
        lines.append("(absolute values; --baseline vanilla shows the other rows as Δ vs Vanilla)")
    if report.baseline and not report.paired.empty:
        sig = report.paired[(report.paired["p_t"] < 0.05) & report.paired["metric"].isin(report.table_metrics)]
        lines.append(
            f"paired tests vs {report.baseline}: {len(sig)} of {int(report.paired['metric'].isin(report.table_metrics).sum())} "
            f"differences in {','.join(report.table_metrics)} have p < 0.05 (paired t); see paired_tests.md"
        )
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
        doc = [
            p
            for p in report.files
            if p.suffix == ".md"
            and p.name not in {f"{n}.md" for n in ("summary", "table_paper", "paired_tests", "projection")}
        ]
        lines.append(f"wrote {len(report.files)} files under {root}" + (f"; the document: {doc[-1]}" if doc else ""))
    return "\n".join(lines)

"""`python -m cl_bench.report <run dirs or sweep dirs> [--baseline METHOD] [--out DIR]`: tables,
paired tests and figures from many runs.

`build_report` is the one call behind the command (docs/results.md is one such call); see the
README section "Reports" for the files written. How runs are read, grouped and compared:
cl_bench/report/collect.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..infra.errors import ConfigError
from .collect import PAPER_METRICS, Report, collect
from .document import console_text, write_document
from .figure_files import write_figures
from .paper_names import METRICS_AS
from .tables import FORMATS, write_tables

PLOTS = ("all", "summary", "none")


def build_report(
    paths: list[str],
    baseline: str | None = None,
    out: str | Path | None = None,
    formats: tuple[str, ...] = ("csv", "md", "tex"),
    markdown: str | Path | None = None,
    plots: str = "all",
    table_metrics: list[str] | None = None,
    title: str | None = None,
    notes_file: str | Path | None = None,
    command: str | None = None,
    progress: bool | None = None,
    metrics_as: str | None = None,
) -> Report:
    """The report command as one call: collect, then (with `out`) write the tables in `formats`,
    the figures under out/figures (`plots`: "all", "summary" = no per-run figures, "none"), and the
    Markdown document (`markdown`, default out/report.md). `metrics_as`: a paper (METRICS_AS) whose
    metric names head one more table (printed instead of the summary, and written as
    out/metrics_as_<paper>.*)."""
    report = collect(paths, baseline, table_metrics, progress, metrics_as)
    if out is not None:
        out = Path(out)
        report.files += write_tables(report, out, formats)
        if plots not in PLOTS:
            raise ConfigError(f"--plots: unknown {plots!r}; valid: {', '.join(PLOTS)}")
        figures = write_figures(report, out / "figures", progress, per_run=plots == "all") if plots != "none" else {}
        report.files += [p for ps in figures.values() for p in ps]
        doc = Path(markdown) if markdown else out / "report.md"
        notes = Path(notes_file).read_text() if notes_file else None
        report.files.append(write_document(report, doc, figures, title=title, notes=notes, command=command))
    elif markdown:
        raise ConfigError("--markdown needs --out (the folder for the tables and figures it links)")
    return report


def main(argv: list[str] | None = None) -> int:
    """The command line (argv None: sys.argv); prints the summary. Returns the exit code: 0, or 2
    with a one-line error on stderr for a bad option or no runs."""
    parser = argparse.ArgumentParser(prog="python -m cl_bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run dirs, sweep dirs or results.json files")
    parser.add_argument(
        "--baseline", help="method shown absolute; other rows as Δ vs it (e.g. vanilla, lora_ga, 'Slice c=1.0')"
    )
    parser.add_argument("--out", help="folder for the tables, figures/ and report.md (README: Reports)")
    parser.add_argument(
        "--format",
        default="csv,md,tex",
        help="table formats to write, comma-separated from csv, md, tex (default: all)",
    )
    parser.add_argument(
        "--markdown", help="write the Markdown document here instead of OUT/report.md (e.g. docs/results.md)"
    )
    parser.add_argument(
        "--metrics", help=f"metrics of the paper-layout table and tests shown (default {','.join(PAPER_METRICS)})"
    )
    parser.add_argument(
        "--metrics-as",
        choices=list(METRICS_AS),
        help="print (and with --out write) the metrics under one paper's names, e.g. ps_lora: Acc, AAA, BWT, "
        "FWT (vs from-scratch runs), FR (its peak rule); docs/REPRODUCIBILITY.md maps each paper's columns to ours",
    )
    parser.add_argument(
        "--plots",
        default="all",
        choices=PLOTS,
        help="all (default): every figure; summary: no per-run heatmaps and loss curves (large sweeps); none",
    )
    parser.add_argument("--title", help="title of the Markdown document")
    parser.add_argument(
        "--notes", help="a Markdown file inserted under the document's title (e.g. the reading of the results)"
    )
    args = parser.parse_args(argv)
    try:
        formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
        bad = [f for f in formats if f not in FORMATS]
        if bad:
            raise ConfigError(f"--format: unknown {', '.join(bad)}; valid: {', '.join(FORMATS)}")
        metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
        command = "python -m cl_bench.report " + " ".join(argv if argv is not None else sys.argv[1:])
        report = build_report(
            args.paths,
            args.baseline,
            args.out,
            formats,
            args.markdown,
            args.plots,
            metrics,
            args.title,
            args.notes,
            command,
            metrics_as=args.metrics_as,
        )
    except ConfigError as exc:
        print(f"cl_bench.report: error: {exc}", file=sys.stderr)
        return 2
    print(console_text(report))
    return 0

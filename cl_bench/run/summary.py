"""The readable end-of-run summary: the results matrix, the metrics, what happened at each stage's
init, warnings when the numbers cannot mean much, and where the files are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..evaluation.baselines import floor_of

MODEL_SIZES_SECTION = "Which model for which benchmark"


def _fmt(v: Any) -> str:
    return "   -  " if v is None else f"{v:6.1f}"


def floor_warnings(results: dict[str, Any]) -> list[str]:
    """Tasks whose score never beats its floor in any row of the matrix (floor = max(chance,
    majority) for tasks with a label set, else 0): the model does not learn them at all."""
    out = []
    baselines = results.get("baselines") or {}
    for j, task in enumerate(results["tasks"]):
        column = [row[j] for row in results["matrix"] if row[j] is not None]
        if not column:
            continue
        best, floor = max(column), floor_of(baselines.get(task))
        if best <= 0.0:
            out.append(
                f"{task}: 0.0 in every row - the model cannot do this task; use a larger model "
                f"(README: '{MODEL_SIZES_SECTION}')"
            )
        elif best <= floor + 1e-9:
            b = baselines.get(task) or {}
            which = "majority-answer" if (b.get("majority") or 0) > (b.get("chance") or 0) else "chance"
            out.append(
                f"{task}: never above its {which} baseline ({floor:.1f}) in any row (best {best:.1f}) - "
                "not learned; train longer or use a larger model"
            )
    return out


def truncation_lines(results: dict[str, Any]) -> list[str]:
    """One line per task whose prompts were cut (results.json `prompt_truncation`): how many of
    its training and evaluated prompts lost part of the input field, and how many part of the
    instruction or template as well."""
    lines = []
    for task, stats in (results.get("prompt_truncation") or {}).items():
        parts = []
        for split, limit in (("train", "trainer.max_len"), ("eval", "the evaluation prompt budget")):
            st = stats.get(split) or {}
            if st.get("input_cut") or st.get("instruction_cut"):
                beyond = f", {st['instruction_cut']} into the instruction" if st.get("instruction_cut") else ""
                parts.append(
                    f"{st['input_cut'] + st['instruction_cut']} of {st['prompts']} {split} prompts cut at {limit}{beyond}"
                )
        if parts:
            lines.append(f"{task}: " + "; ".join(parts))
    return lines


def projection_lines(results: dict[str, Any]) -> list[str]:
    """Per stage, whether a gradient projection (SLICE's psi) fired, with cos(G_cur, G_prev) and
    gamma as the initializer recorded them; empty for initializers without a projection."""
    lines = []
    for st in results.get("stages") or []:
        init = st.get("init") or {}
        text = init.get("projection")
        if text is None or str(text).startswith("not applicable"):
            continue
        extra = []
        if init.get("cos_global") is not None:
            extra.append(f"cos={init['cos_global']:+.4f}")
        if init.get("gamma") is not None:
            extra.append(f"gamma={init['gamma']:.4g}")
        lines.append(f"  stage {st['stage']} ({st['task']}): {text}" + (f" [{', '.join(extra)}]" if extra else ""))
    return lines


def where_lines(run_dir: str | Path) -> list[str]:
    d = Path(run_dir)
    log = [f"log:         {d / 'cl_bench.log'}"] if (d / "cl_bench.log").exists() else []
    return [
        f"run dir:     {d}",
        f"results:     {d / 'results.json'}",
        f"predictions: {d / 'predictions'}/stage_XX/<task>.jsonl",
        *log,
        f"report:      python -m cl_bench.report {d}   (several runs: give their parent folder)",
    ]


def format_summary(results: dict[str, Any], run_dir: str | Path | None = None) -> str:
    tasks = results["tasks"]
    width = max(8, *(len(t) for t in tasks)) if tasks else 8
    mode = results.get("mode", "sequential")
    rows = {
        "multitask": "row 1 = after joint training on all tasks",
        "independent": "row i = the base model trained on task i alone",
    }.get(mode, "row i = after stage i")
    lines = [f"\n== {results['sequence']}{'' if mode == 'sequential' else f' ({mode})'}: results matrix (%, {rows}) =="]
    lines.append(" " * 10 + " ".join(f"{j + 1:>6}" for j in range(len(tasks))))
    for i, row in enumerate(results["matrix"]):
        label = "before" if i == 0 else ("joint" if mode == "multitask" else f"stage {i}")
        lines.append(f"{label:<10}" + " ".join(_fmt(v) for v in row))
    baselines = results.get("baselines") or {}
    for kind in ("chance", "majority"):
        values = [(baselines.get(t) or {}).get(kind) for t in tasks]
        if any(v is not None for v in values):
            lines.append(f"{kind:<10}" + " ".join("   n/a" if v is None else f"{v:6.1f}" for v in values))
    if baselines and not any(v is not None for b in baselines.values() for v in (b.get("chance"), b.get("majority"))):
        lines.append("chance/majority baselines: n/a (no task has a label set)")
    lines.append("tasks: " + ", ".join(f"{j + 1}={t:<{width}}".rstrip() for j, t in enumerate(tasks)))
    metrics = results.get("metrics") or {}
    if metrics:
        lines.append("metrics: " + "  ".join(f"{k}={'n/a' if v is None else f'{v:.2f}'}" for k, v in metrics.items()))
    general = results.get("general") or {}
    for stage, g in sorted(general.items(), key=lambda kv: int(kv[0])):
        zs = ", ".join(f"{b}={v:.1f}" for b, v in (g.get("zero_shot") or {}).items())
        fs = ", ".join(f"{b}={v:.1f}" for b, v in (g.get("few_shot") or {}).items())
        cut = g.get("truncated_contexts") or {}
        cut_text = (
            f"  truncated prompts: zero-shot {cut.get('zero_shot', 0)}, few-shot {cut.get('few_shot', 0)}"
            if cut
            else ""
        )
        lines.append(f"general @ stage {stage}: zero-shot [{zs}]  few-shot [{fs}]{cut_text}")
    projection = projection_lines(results)
    if projection:
        lines.append("gradient projection at init:")
        lines.extend(projection)
    notices = [f"{t}: {st['notice']}" for t, st in (results.get("split_stats") or {}).items() if st.get("notice")]
    if notices:
        lines.append("data notes:")
        lines.extend(f"  {n}" for n in notices)
    cut = truncation_lines(results)
    if cut:
        lines.append("truncated prompts (only the input field is cut, unless said):")
        lines.extend(f"  {c}" for c in cut)
    warnings = floor_warnings(results) if results.get("complete") else []
    if warnings:
        lines.append("warnings:")
        lines.extend(f"  {w}" for w in warnings)
    lines.append(f"status: {results.get('status', 'complete' if results.get('complete') else 'incomplete')}")
    if run_dir is not None:
        lines.extend(where_lines(run_dir))
    return "\n".join(lines)

"""The readable end-of-run summary: the results matrix and the metrics."""
from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    return "   -  " if v is None else f"{v:6.1f}"


def format_summary(results: dict[str, Any]) -> str:
    tasks = results["tasks"]
    width = max(8, *(len(t) for t in tasks)) if tasks else 8
    lines = [f"\n== {results['sequence']}: results matrix (%, row i = after stage i) =="]
    lines.append(" " * 10 + " ".join(f"{j + 1:>6}" for j in range(len(tasks))))
    for i, row in enumerate(results["matrix"]):
        label = "before" if i == 0 else f"stage {i}"
        lines.append(f"{label:<10}" + " ".join(_fmt(v) for v in row))
    lines.append("tasks: " + ", ".join(f"{j + 1}={t:<{width}}".rstrip() for j, t in enumerate(tasks)))
    metrics = results.get("metrics") or {}
    if metrics:
        lines.append("metrics: " + "  ".join(f"{k}={'n/a' if v is None else f'{v:.2f}'}" for k, v in metrics.items()))
    general = results.get("general") or {}
    for stage, g in sorted(general.items(), key=lambda kv: int(kv[0])):
        zs = ", ".join(f"{b}={v:.1f}" for b, v in (g.get("zero_shot") or {}).items())
        fs = ", ".join(f"{b}={v:.1f}" for b, v in (g.get("few_shot") or {}).items())
        cut = g.get("truncated_contexts") or {}
        cut_text = f"  truncated prompts: zero-shot {cut.get('zero_shot', 0)}, few-shot {cut.get('few_shot', 0)}" if cut else ""
        lines.append(f"general @ stage {stage}: zero-shot [{zs}]  few-shot [{fs}]{cut_text}")
    lines.append(f"status: {results.get('status', 'complete' if results.get('complete') else 'incomplete')}")
    return "\n".join(lines)

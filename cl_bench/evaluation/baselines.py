"""Per-task reference scores that say whether a results matrix means anything.

chance   = 100 / |label set|: the expected score of a uniform random guess among the labels.
majority = the score of always giving the training split's most common label, on the evaluated
           examples (scored by the task's own metric).
Both are defined only for classification tasks with a label set; free-text and numeric tasks
get None ("n/a"): no constant or random answer is a meaningful floor there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..data.answers import chosen_label
from ..data.tasks.base import TaskData
from .scoring import score


def task_baseline(task: TaskData, limit: int | None = None) -> dict[str, Any]:
    """{"chance": % or None, "majority": % or None, "majority_answer": label or None}."""
    if not task.labels:
        return {"chance": None, "majority": None, "majority_answer": None}
    labels = list(task.labels)
    # Targets may carry more than the label (e.g. TRACE's "Answer: B"); count the label they choose.
    counts = Counter(chosen_label(ex.target, labels) or ex.target for ex in task.train)
    answer = max(counts.items(), key=lambda kv: (kv[1], -labels.index(kv[0]) if kv[0] in labels else 0))[0]
    examples = task.eval[:limit] if limit else task.eval
    majority = (
        100.0 * sum(score(task.metric, answer, ex.target, labels, source=ex.source) for ex in examples) / len(examples)
    )
    return {"chance": 100.0 / len(labels), "majority": majority, "majority_answer": answer}


def baselines(tasks: Sequence[TaskData], limit: int | None = None) -> dict[str, dict[str, Any]]:
    return {t.name: task_baseline(t, limit) for t in tasks}


def floor_of(baseline: dict[str, Any] | None) -> float:
    """The score a task must beat to show it learned anything: max(chance, majority), else 0."""
    b = baseline or {}
    values = [v for v in (b.get("chance"), b.get("majority")) if v is not None]
    return max(values, default=0.0)

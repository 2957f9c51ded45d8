"""Task families. Each family is one module exposing

    load_task(name, *, root, n_train, n_eval, seed) -> TaskData

`root` is `data.root` (or None); the family looks for its own layout below it and raises
DataError naming the task, the paths tried and how to get the data when nothing is found.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from ...infra.errors import ConfigError, DataError
from .base import PROTOCOLS, Example, TaskData, split_examples

# family name -> module; a new family = one module + an entry here.
FAMILIES = {
    "synthetic": "cl_bench.data.tasks.synthetic",
    "superni": "cl_bench.data.tasks.superni",
    "trace": "cl_bench.data.tasks.trace",
    "cl_benchmark": "cl_bench.data.tasks.cl_benchmark",
}


def family_module(family: str):
    if family not in FAMILIES:
        raise ConfigError(f"sequence.family={family!r} is unknown; valid: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[family])


def load_sequence(seq: Any, root: str | None, seed: int) -> list[TaskData]:
    """Load every task of a sequence config (name, family, tasks, n_train, n_eval, metrics).

    All tasks are tried before failing, so one message names every missing or broken task."""
    module = family_module(seq.family)
    overrides = dict(seq.get("metrics") or {})
    unknown = sorted(set(overrides) - {str(t) for t in seq.tasks})
    if unknown:
        raise ConfigError(f"sequence.metrics names tasks not in sequence.tasks: {', '.join(unknown)}")
    check_distinct(module, [str(t) for t in seq.tasks])
    tasks, errors = [], []
    for name in map(str, seq.tasks):
        kwargs = {"metric": overrides[name]} if name in overrides else {}
        if kwargs and "metric" not in inspect.signature(module.load_task).parameters:
            raise ConfigError(
                f"sequence.metrics: family {seq.family!r} fixes its metrics; remove the override for {name}"
            )
        try:
            tasks.append(
                module.load_task(name, root=root, n_train=seq.n_train, n_eval=int(seq.n_eval), seed=seed, **kwargs)
            )
        except DataError as exc:
            errors.append((name, str(exc)))
    if errors:
        # The first task's full message, then only the names: one readable line, not one per task.
        more = (
            (
                f" (and {len(errors) - 1} more task(s): {', '.join(n for n, _ in errors[1:])}; "
                f"`python -m cl_bench.data_check data.root=DIR` lists what each sequence lacks)"
            )
            if len(errors) > 1
            else ""
        )
        raise DataError(errors[0][1] + more)
    return tasks


def check_distinct(module, names: list[str]) -> None:
    """ConfigError when two entries of sequence.tasks are one task under two spellings (SST-2 and
    sst2, task363 and task363_sst2_polarity_classification): compared as the family resolves them."""
    resolve = getattr(module, "resolve_task_name", None)
    seen: dict[str, str] = {}
    for name in names:
        try:
            identity = resolve(name) if resolve else name
        except DataError:  # an unknown name: loading it says so
            identity = name
        if identity in seen:
            spelled = f"{seen[identity]!r} and {name!r}" if seen[identity] != name else f"{name!r} twice"
            raise ConfigError(
                f"sequence.tasks={names} lists task {identity!r} twice ({spelled}); valid: distinct tasks"
            )
        seen[identity] = name


def data_fingerprint(tasks: list[TaskData]) -> str:
    """SHA-256 of what a run trains and evaluates on (every task's name, metric and examples, in
    order): the identity of the data, wherever its folder lies (a resume compares it, not data.root)."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for t in tasks:
        rows = [[ex.id, ex.prompt, ex.target, list(ex.all_references)] for ex in (*t.train, *t.eval)]
        digest.update(json.dumps([t.name, t.metric, len(t.train), rows], ensure_ascii=False).encode())
    return digest.hexdigest()


def split_stats(tasks: list[TaskData]) -> dict[str, dict[str, int]]:
    """results.json `split_stats`: {task: {"train", "eval", "dropped_duplicates"}}."""
    return {t.name: t.split_stats for t in tasks}


def evaluation_record(tasks: list[TaskData], protocol: str) -> dict[str, Any]:
    """results.json `evaluation`: the scoring protocol and the metric each task is scored by."""
    return {"protocol": protocol, "metrics": {t.name: t.metric_for(protocol) for t in tasks}}


__all__ = [
    "Example",
    "TaskData",
    "PROTOCOLS",
    "split_examples",
    "split_stats",
    "evaluation_record",
    "data_fingerprint",
    "load_sequence",
    "family_module",
    "FAMILIES",
]

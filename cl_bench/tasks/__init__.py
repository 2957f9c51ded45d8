"""Task families. Each family is one module exposing

    load_task(name, *, root, n_train, n_eval, seed) -> TaskData

`root` is `data.root` (or None); the family looks for its own layout below it and raises
DataError naming the task, the paths tried and how to get the data when nothing is found.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import ConfigError
from .base import Example, TaskData, split_examples

# family name -> module; a new family = one module + an entry here.
FAMILIES = {
    "synthetic": "cl_bench.tasks.synthetic",
    "superni": "cl_bench.tasks.superni",
    "trace": "cl_bench.tasks.trace",
    "cl_benchmark": "cl_bench.tasks.cl_benchmark",
}


def family_module(family: str):
    if family not in FAMILIES:
        raise ConfigError(f"sequence.family={family!r} is unknown; valid: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[family])


def load_sequence(seq: Any, root: str | None, seed: int) -> list[TaskData]:
    """Load every task of a sequence config (name, family, tasks, n_train, n_eval)."""
    module = family_module(seq.family)
    return [
        module.load_task(str(name), root=root, n_train=seq.n_train, n_eval=int(seq.n_eval), seed=seed)
        for name in seq.tasks
    ]


__all__ = ["Example", "TaskData", "split_examples", "load_sequence", "family_module", "FAMILIES"]

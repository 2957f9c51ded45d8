"""Replay buffers: which training examples of an earlier task a plug-in may draw again."""

from __future__ import annotations

import math
import random

from .tasks.base import TaskData


def check_buffer_size(size) -> int | float:
    """A replay-buffer size per task: an int >= 1 (a count of training examples) or a float in
    (0, 1] (a fraction of the task's training split). Returns it; raises ValueError otherwise."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ValueError(f"{size!r} must be a count (an integer >= 1) or a fraction in (0, 1]")
    if isinstance(size, int) and size < 1 or isinstance(size, float) and not 0.0 < size <= 1.0:
        raise ValueError(f"{size!r} must be a count (an integer >= 1) or a fraction in (0, 1]")
    return size


def replay_buffer_indices(task: TaskData, size: int | float, seed: int) -> list[int]:
    """The replay buffer of `task`: sorted indices into task.train (never its eval split).

    `size` is a count (int, capped at the split) or a fraction of the split (float, rounded up,
    at least 1). The examples are the first k of a permutation seeded by (run seed, task name)
    alone, so the buffer of a task is the same at every later stage, after any resume and for
    every plug-in that asks with the same size (replay, SLICE's previous-task capture), and a
    smaller buffer is a subset of a larger one. Raises ValueError for a bad size.
    """
    check_buffer_size(size)
    n = len(task.train)
    k = min(n, size if isinstance(size, int) else max(1, math.ceil(size * n)))
    # str seeding hashes with SHA-512: the same in every process, whatever PYTHONHASHSEED says
    order = random.Random(f"replay-buffer/{int(seed)}/{task.name}").sample(range(n), n)
    return sorted(order[:k])

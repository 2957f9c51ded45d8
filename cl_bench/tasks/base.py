"""What every task family yields: examples with a prompt and a target, split by one seeded rule."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import DataError

# Metric names a task may declare; scoring.py implements each one.
VALID_METRICS = ("exact_match", "rouge_l", "accuracy", "edit_similarity", "sari")


@dataclass(frozen=True)
class Example:
    """One prompt/target pair. `prompt` is the user message; the chat template is applied later."""

    id: str
    prompt: str
    target: str
    # Optional explicit chat messages (system/user turns) that replace `prompt` as the user turn.
    messages: tuple[dict, ...] | None = None
    # Extra fields a metric may need (e.g. SARI needs the source sentence).
    source: str | None = None


@dataclass
class TaskData:
    """A task ready for the runner: disjoint train and eval examples plus its metric."""

    name: str
    metric: str
    train: list[Example]
    eval: list[Example]
    labels: list[str] | None = None  # label set for metric "accuracy"
    origin: str = ""  # where it came from (path or generator), recorded in results
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.metric not in VALID_METRICS:
            raise DataError(
                f"task {self.name!r}: unknown metric {self.metric!r}; valid: {', '.join(VALID_METRICS)}"
            )
        if not self.eval:
            raise DataError(f"task {self.name!r} ({self.origin}): no evaluation examples")
        if not self.train:
            raise DataError(f"task {self.name!r} ({self.origin}): no training examples")


def split_examples(
    examples: Sequence[Example], n_train: int | None, n_eval: int, seed: int = 42
) -> tuple[list[Example], list[Example]]:
    """Seeded shuffle, hold out up to `n_eval` for evaluation, train on (up to n_train of) the rest.

    The eval part is taken first and never depends on n_train, so changing the training size
    never changes what is evaluated. Gradient capture and replay draw only from the train part.
    """
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    if len(idx) < 2:
        raise DataError(f"need at least 2 examples to split, got {len(idx)}")
    n_hold = min(n_eval, len(idx) // 2)  # small tasks: never more eval than train
    held, rest = idx[:n_hold], idx[n_hold:]
    if n_train is not None:
        rest = rest[:n_train]
    return [examples[i] for i in rest], [examples[i] for i in held]


def split_train_test(
    train_pool: Sequence[Example], test_pool: Sequence[Example], n_train: int | None, n_eval: int, seed: int = 42
) -> tuple[list[Example], list[Example], int]:
    """Eval = first n_eval of the seed-shuffled test pool; train = the seed-shuffled training
    pool minus any example whose prompt is evaluated, cut to n_train. Returns (train, eval,
    number of training examples dropped for overlapping an eval prompt)."""
    test_idx = list(range(len(test_pool)))
    random.Random(seed).shuffle(test_idx)
    evaluated = [test_pool[i] for i in test_idx[:n_eval]]
    eval_prompts = {(ex.prompt, ex.messages) for ex in evaluated}
    train_idx = list(range(len(train_pool)))
    random.Random(seed).shuffle(train_idx)
    kept = [train_pool[i] for i in train_idx if (train_pool[i].prompt, train_pool[i].messages) not in eval_prompts]
    dropped = len(train_pool) - len(kept)
    if n_train is not None:
        kept = kept[:n_train]
    return kept, evaluated, dropped


def split_for_task(
    train_pool: Sequence[Example], test_pool: Sequence[Example] | None, n_train: int | None, n_eval: int, seed: int
) -> tuple[list[Example], list[Example], dict]:
    """The one split rule of the file-based families; `info` says which branch was taken."""
    if test_pool:
        train, evaluated, dropped = split_train_test(train_pool, test_pool, n_train, n_eval, seed)
        return train, evaluated, {"eval_from": "test file", "train_dropped_overlap": dropped}
    train, evaluated = split_examples(list(train_pool), n_train, n_eval, seed)
    return train, evaluated, {"eval_from": "held out of the training file"}


def data_roots(root: str | os.PathLike | None) -> list[Path]:
    """`data.root`, else env CL_BENCH_DATA; empty when neither is set."""
    chosen = root if root not in (None, "") else os.environ.get("CL_BENCH_DATA") or None
    return [Path(chosen).expanduser()] if chosen else []

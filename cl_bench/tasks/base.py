"""What every task family yields: examples with a prompt and a target, split by one seeded rule."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
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

"""What every task family yields: examples with a prompt and references, split by one seeded rule."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...infra.errors import DataError

# Metric names a task may declare; scoring.py implements each one.
VALID_METRICS = (
    "exact_match",
    "rouge_l",
    "accuracy",
    "edit_similarity",
    "sari",
    "ni_exact_match",
    "ni_rouge_l",
    "slice_exact_match",
    "slice_rouge_l",
)
# evaluation.protocol: `per_task` scores each task by its family's (official) metric;
# `slice_paper` by the SLICE authors' metric for it (their cl_lora/eval.py; docs/design.md §8).
PROTOCOLS = ("per_task", "slice_paper")
# The authors' evaluator scored label-like tasks by exact match and the rest by ROUGE-L; tasks
# they never ran (CL benchmark, synthetic, unregistered SuperNI tasks) map by the kind of answer.
_SLICE_PAPER_BY_METRIC = {
    "exact_match": "slice_exact_match",
    "ni_exact_match": "slice_exact_match",
    "accuracy": "slice_exact_match",
}


@dataclass(frozen=True)
class Example:
    """One prompt and its reference answers. `prompt` is the user message (the chat template is
    applied later); `target` is the answer trained on; `references` are every valid answer the
    data gives (empty = just `target`), all of them used for scoring."""

    id: str
    prompt: str
    target: str
    # Optional explicit chat messages (system/user turns) that replace `prompt` as the user turn.
    messages: tuple[dict, ...] | None = None
    # Extra fields a metric may need (e.g. SARI needs the source sentence).
    source: str | None = None
    references: tuple[str, ...] = ()
    # [start, end) characters of `prompt` holding the task's input (data/prompts.py cuts only there
    # when a prompt is too long); None: the whole prompt is input (no separate instruction known).
    input_span: tuple[int, int] | None = None

    @property
    def all_references(self) -> tuple[str, ...]:
        return self.references or (self.target,)


def prompt_key(example: Example) -> tuple:
    """What makes two examples the same question: the prompt (and chat turns) with whitespace
    runs collapsed, so a copy that differs only in spacing still counts as a duplicate."""

    def squash(text: str) -> str:
        return " ".join(str(text).split())

    turns = tuple((m.get("role"), squash(m.get("content", ""))) for m in example.messages) if example.messages else None
    return squash(example.prompt), turns


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
    # The SLICE authors' metric for this task (evaluation.protocol=slice_paper); None = by `metric`.
    paper_metric: str | None = None

    def __post_init__(self) -> None:
        for metric in (self.metric, self.paper_metric or self.metric):
            if metric not in VALID_METRICS:
                raise DataError(f"task {self.name!r}: unknown metric {metric!r}; valid: {', '.join(VALID_METRICS)}")
        if not self.eval:
            raise DataError(f"task {self.name!r} ({self.origin}): no evaluation examples")
        if not self.train:
            raise DataError(f"task {self.name!r} ({self.origin}): no training examples")

    def metric_for(self, protocol: str = "per_task") -> str:
        """The metric this task is scored by under `protocol` (one of PROTOCOLS)."""
        if protocol == "per_task":
            return self.metric
        if protocol == "slice_paper":
            return self.paper_metric or _SLICE_PAPER_BY_METRIC.get(self.metric, "slice_rouge_l")
        raise ValueError(f"evaluation.protocol={protocol!r}; valid: {', '.join(PROTOCOLS)}")

    @property
    def split_stats(self) -> dict[str, int]:
        """For results.json `split_stats`: sizes and training examples dropped as duplicates of
        an evaluated prompt."""
        stats = {
            "train": len(self.train),
            "eval": len(self.eval),
            "dropped_duplicates": int(self.info.get("dropped_duplicates", 0)),
        }
        if self.info.get("notice"):  # e.g. an empty test file: evaluated on held-out training examples
            stats["notice"] = str(self.info["notice"])
        return stats


def drop_evaluated(
    train_candidates: Sequence[Example], evaluated: Sequence[Example], n_train: int | None
) -> tuple[list[Example], int]:
    """Training examples whose prompt (`prompt_key`) is not evaluated, cut to n_train after the
    drop; and how many were dropped. Gradient capture, replay and training only see these."""
    eval_keys = {prompt_key(ex) for ex in evaluated}
    kept = [ex for ex in train_candidates if prompt_key(ex) not in eval_keys]
    dropped = len(train_candidates) - len(kept)
    return (kept if n_train is None else kept[:n_train]), dropped


def split_examples(
    examples: Sequence[Example], n_train: int | None, n_eval: int, seed: int = 42
) -> tuple[list[Example], list[Example], int]:
    """Seeded shuffle, hold out up to `n_eval` for evaluation, train on (up to n_train of) the rest
    minus every example whose prompt is evaluated (a file may hold the same input twice: a split
    by index alone puts one copy in each part). Returns (train, eval, dropped duplicates).

    The eval part is taken first and never depends on n_train, so changing the training size
    never changes what is evaluated. Gradient capture and replay draw only from the train part.
    """
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    if len(idx) < 2:
        raise DataError(f"need at least 2 examples to split, got {len(idx)}")
    n_hold = min(n_eval, len(idx) // 2)  # small tasks: never more eval than train
    held = [examples[i] for i in idx[:n_hold]]
    train, dropped = drop_evaluated([examples[i] for i in idx[n_hold:]], held, n_train)
    return train, held, dropped


def split_train_test(
    train_pool: Sequence[Example], test_pool: Sequence[Example], n_train: int | None, n_eval: int, seed: int = 42
) -> tuple[list[Example], list[Example], int]:
    """Eval = first n_eval of the seed-shuffled test pool; train = the seed-shuffled training
    pool minus any example whose prompt is evaluated, cut to n_train. Returns (train, eval,
    number of training examples dropped for overlapping an eval prompt)."""
    test_idx = list(range(len(test_pool)))
    random.Random(seed).shuffle(test_idx)
    evaluated = [test_pool[i] for i in test_idx[:n_eval]]
    train_idx = list(range(len(train_pool)))
    random.Random(seed).shuffle(train_idx)
    kept, dropped = drop_evaluated([train_pool[i] for i in train_idx], evaluated, n_train)
    return kept, evaluated, dropped


def split_for_task(
    train_pool: Sequence[Example],
    test_pool: Sequence[Example] | None,
    n_train: int | None,
    n_eval: int,
    seed: int,
    test_file: str | os.PathLike | None = None,
) -> tuple[list[Example], list[Example], dict]:
    """The one split rule of the file-based families; `info` says which branch was taken and
    how many training examples were dropped as duplicates of an evaluated prompt. A test file
    that exists but holds no example (`test_pool == []`, `test_file` its path) is not silently
    the same as none: `info["notice"]` says that evaluation moved to held-out training examples."""
    if test_pool:
        train, evaluated, dropped = split_train_test(train_pool, test_pool, n_train, n_eval, seed)
        return train, evaluated, {"eval_from": "test file", "dropped_duplicates": dropped}
    train, evaluated, dropped = split_examples(list(train_pool), n_train, n_eval, seed)
    info = {"eval_from": "held out of the training file", "dropped_duplicates": dropped}
    if test_pool is not None:
        where = test_file or "the test file"
        info["notice"] = (
            f"{where} holds no example: evaluating on {len(evaluated)} examples held out of the training file instead"
        )
    return train, evaluated, info


def data_roots(root: str | os.PathLike | None) -> list[Path]:
    """`data.root`, else env CL_BENCH_DATA; empty when neither is set."""
    chosen = root if root not in (None, "") else os.environ.get("CL_BENCH_DATA") or None
    return [Path(chosen).expanduser()] if chosen else []

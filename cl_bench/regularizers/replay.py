"""Experience replay (ER; Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual
Learning"): every micro-batch of stage t gets `per_micro_batch` training examples of the
earlier tasks' replay buffers added to it, and they are trained with the same LM loss.

The buffer of a task is `ctx.replay_buffer(task, buffer_size)` (stage.replay_buffer_indices):
`buffer_size` of its TRAINING split (a count, or a fraction rounded up), chosen by the run seed
and the task name alone, never evaluation examples, the same at every later stage and after a
resume. SLICE's previous-task capture draws from the very same buffer when it is given the same
size (initializer.prev_buffer), so ER and SLICE can be made to see identical old data.

Drawing: the union of the buffers of tasks 1..t−1 (each buffered example equally likely, so
tasks with equal buffers weigh equally) is walked in passes, each pass a fresh permutation
seeded by (stage seed, pass); micro-batch `micro` of step `step` takes the next
`per_micro_batch` items. Every buffered example is thus replayed equally often, and the draw is
a pure function of (ctx.seed, step, micro, grad_accum): a resumed stage replays the same
examples. Replayed tokens count in the step's token-mean LM loss like the current task's
(the loop's num_items_in_batch includes them). Stage 1 replays nothing.

Memory: the buffers' indices; the examples are the training examples already tokenized by the
runner. State: the buffer indices per task (JSON), kept only to refuse a resume whose data give
a different buffer (begin_stage raises).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch

from ..data.replay import check_buffer_size
from ..data.tasks.base import TaskData
from ..infra.errors import ConfigError
from ..stage import Regularizer, StageContext


class Replay(Regularizer):
    name = "replay"

    def __init__(self, buffer_size: int | float = 0.1, per_micro_batch: int = 4):
        try:
            check_buffer_size(buffer_size)
        except ValueError as exc:
            raise ConfigError(f"regularizer.buffer_size={exc}") from None
        if isinstance(per_micro_batch, bool) or not isinstance(per_micro_batch, int) or per_micro_batch < 1:
            raise ConfigError(f"regularizer.per_micro_batch={per_micro_batch!r} must be an integer >= 1")
        self.buffer_size, self.per_micro_batch = buffer_size, per_micro_batch
        self.buffers: dict[str, list[int]] = {}  # task name -> indices into its train split
        self.pool: list[tuple[TaskData, int]] = []
        self._passes: dict[tuple[int, int], list[int]] = {}
        self._stage: int | None = None  # the stage self.pool was built for

    def _build(self, ctx: StageContext) -> None:
        self.pool = []
        for task in ctx.previous:
            indices = ctx.replay_buffer(task, self.buffer_size)
            stored = self.buffers.setdefault(task.name, indices)
            if stored != indices:
                raise ConfigError(
                    f"replay buffer of task {task.name!r} differs from the one this run started with "
                    f"({len(stored)} vs {len(indices)} examples); its training split changed since"
                )
            self.pool += [(task, i) for i in indices]
        self._passes = {}
        self._stage = ctx.stage

    def begin_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        self._build(ctx)

    def end_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        self.buffers.setdefault(ctx.current.name, ctx.replay_buffer(ctx.current, self.buffer_size))

    def _pass(self, seed: int, p: int) -> list[int]:
        if (seed, p) not in self._passes:
            self._passes = {
                (seed, p): random.Random(f"replay/{seed}/{p}").sample(range(len(self.pool)), len(self.pool))
            }
        return self._passes[(seed, p)]

    def extra_examples(self, ctx: StageContext, step: int, micro: int) -> list[tuple[TaskData, int]]:
        if getattr(self, "_stage", None) != ctx.stage:
            self._build(ctx)
        if not self.pool:
            return []
        n, k = len(self.pool), self.per_micro_batch
        start = (step * ctx.grad_accum + micro) * k
        return [self.pool[self._pass(ctx.seed, g // n)[g % n]] for g in range(start, start + k)]

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": {name: list(idx) for name, idx in self.buffers.items()}} if self.buffers else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffers = {name: [int(i) for i in idx] for name, idx in state.get("buffers", {}).items()}
        self._stage = None

"""What watches a run without changing it: the progress display, the W&B tracker, the kill points
of the crash tests, a cost meter. Each is an `Observer`; the runner calls every observer at the
same named moments, in the order they were given (`Observers`).

Moments of a run, in order (stage 0 is the evaluation before any training):

  before_run(results)                          model loaded; results new or read back (resume)
  per trained stage t:
    before_stage(t, task)                      before the adapter starts
    after_init(t, stats, seconds)              the init applied (stats as in results.json)
    before_training(t, task, total, start)     optimizer steps start (at `start` when resumed)
    after_train_step(t, step, terms)           each optimizer step, in order, once its loss terms
                                               are read (every trainer.log_every_steps; after the
                                               step's in-stage checkpoint)
    after_training(t, summary, model)          `model`: the PEFT model, adapters still attached
    after_stage_trained(t, record)             stage files, plug-in and model states written
  per evaluated row t (0 first, when it is missing; then after each stage):
    before_eval_row(t, n_tasks)
    before_eval_task(t, j, task) / after_eval_task(t, j, task, score)   score in [0, 100];
                                               after: the task's predictions are written
    after_eval_row(t)
    before_general(t) / after_general(t, result)   only where GP/IP are measured
    after_stage_saved(t, results)              results.json holds row t
  after_run(results)                           complete: metrics computed and saved
  on_failure(exc)                              an exception (or Ctrl-C) ends the run

Every rank calls its observers; an observer that must act once (W&B) looks at the rank itself.
An observer must not change the model, the results or the RNG: results are identical with any
observers subscribed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..infra.console import Progress
from ..infra.faults import kill_point
from ..infra.jobs import Job, Requeued
from .tracking import NullTracker, make_tracker


class Observer:
    """Every moment of a run as a no-op method; override the ones you need (module doc)."""

    def before_run(self, results: dict[str, Any]) -> None: ...
    def before_stage(self, stage: int, task: str) -> None: ...
    def after_init(self, stage: int, stats: dict[str, Any], seconds: float) -> None: ...
    def before_training(self, stage: int, task: str, total_steps: int, start_step: int) -> None: ...
    def after_train_step(self, stage: int, step: int, terms: Mapping[str, float]) -> None: ...
    def after_training(self, stage: int, summary: dict[str, Any], model) -> None: ...
    def after_stage_trained(self, stage: int, record: dict[str, Any]) -> None: ...
    def before_eval_row(self, stage: int, n_tasks: int) -> None: ...
    def before_eval_task(self, stage: int, j: int, task: str) -> None: ...
    def after_eval_task(self, stage: int, j: int, task: str, score: float) -> None: ...
    def after_eval_row(self, stage: int) -> None: ...
    def before_general(self, stage: int) -> None: ...
    def after_general(self, stage: int, result: dict[str, Any]) -> None: ...
    def after_stage_saved(self, stage: int, results: dict[str, Any]) -> None: ...
    def after_run(self, results: dict[str, Any]) -> None: ...
    def on_failure(self, exc: BaseException) -> None: ...


MOMENTS = tuple(name for name in vars(Observer) if not name.startswith("_"))


class Observers:
    """Several observers as one: `observers.after_init(...)` calls each member's, in order."""

    def __init__(self, members):
        self.members: list[Observer] = list(members)

    def __getattr__(self, moment: str):
        if moment not in MOMENTS:
            raise AttributeError(f"{moment!r} is not an observer moment; valid: {', '.join(MOMENTS)}")

        def call(*args, **kwargs) -> None:
            for member in self.members:
                getattr(member, moment)(*args, **kwargs)

        return call


class ProgressObserver(Observer):
    """The console display (infra/console.Progress): bars on a terminal, one line per phase."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def before_stage(self, stage, task):
        self.progress.init_begin(stage, task)

    def after_init(self, stage, stats, seconds):
        self.progress.init_end(stats, seconds)

    def before_training(self, stage, task, total_steps, start_step):
        self.progress.train_begin(stage, task, total_steps, start_step)

    def after_train_step(self, stage, step, terms):
        self.progress.train_step(step, terms)

    def after_training(self, stage, summary, model):
        self.progress.train_end(summary)

    def before_eval_row(self, stage, n_tasks):
        self.progress.eval_begin(stage, n_tasks)

    def before_eval_task(self, stage, j, task):
        self.progress.eval_task_begin(task)

    def after_eval_task(self, stage, j, task, score):
        self.progress.eval_task_end(task, score)

    def after_eval_row(self, stage):
        self.progress.eval_end()

    def before_general(self, stage):
        self.progress.general_begin(stage)

    def after_general(self, stage, result):
        self.progress.general_end(result)

    def on_failure(self, exc):
        self.progress.close()


class TrackerObserver(Observer):
    """W&B (run/tracking.py), on rank 0 only: steps, each saved row, the final summary. The W&B
    run is closed however the job ends (marked preempting on a requeue)."""

    def __init__(self, logger_cfg, run_dir, job: Job, main: bool):
        self.logger_cfg, self.run_dir, self.job = logger_cfg if main else {}, run_dir, job
        self.tracker: NullTracker = NullTracker()

    def before_run(self, results):
        self.tracker = make_tracker(self.logger_cfg, results, self.run_dir)
        tracker = self.tracker
        self.job.on_exit(lambda exc: tracker.close(exit_code=1, preempted=isinstance(exc, Requeued)))

    def after_train_step(self, stage, step, terms):
        self.tracker.log_step(stage, step, terms)

    def after_stage_saved(self, stage, results):
        self.tracker.log_stage(stage, results)

    def after_run(self, results):
        self.tracker.finish(results)


class KillPoints(Observer):
    """The crash tests' fault points (infra/faults.py): `train:<stage>:<step>`,
    `eval:<stage>:<task index>`, `saved:<stage>`. Subscribed last, so every other observer has
    seen the moment before the process dies."""

    def after_train_step(self, stage, step, terms):
        kill_point(f"train:{stage}:{step}")

    def after_eval_task(self, stage, j, task, score):
        kill_point(f"eval:{stage}:{j}")

    def after_stage_saved(self, stage, results):
        kill_point(f"saved:{stage}")

"""Run modes: the sequential CL run and the two reference points every CL table has.

`mode=` (conf/config.yaml) chooses what a stage trains on and from which model:

  sequential   one LoRA stage per task, in order, each on the model the last stage left (the CL
               run; results.json as in docs/design.md §6, T+1 rows).
  multitask    ONE stage on the union of every task's training split (the joint-training upper
               bound). results.json: `matrix` has 2 rows, row 0 = before training, row 1 = after
               joint training (every task evaluated); `stages` has one entry whose task is
               "multitask" and whose `tasks` lists the tasks joined. Budget: the same examples and
               epochs as the sequential run in total; `trainer.max_steps` (a per-stage cap) is
               multiplied by T so the joint stage gets the sequential run's total step cap.
  independent  one stage per task, each trained from the BASE model (no carry-over): row i of R is
               the model W0 + τ_i evaluated on every task (only the diagonal with
               evaluation.full_matrix=false). R[i,i] is "a_scratch,i", the from-scratch score of
               PS-LoRA's FWT (PS-LoRA paper, App. A.2). Each stage
               sees no previous task (ctx.previous = [], as stage 1 does).

Metrics of the two reference modes (cl_bench.evaluation.metrics.compute_mode_metrics): the trained system is
read as one model per task that never changes after the task is learned (multitask: the joint
model; independent: task i answered by its own adapter, the task identity known at test time).
So AP = FP = mean over tasks of the score right after learning (multitask: the joint row;
independent: the diagonal), Acc the same weighted by test size, and Fgt = BWT = FR = 0 by
construction; FWT and AAA need models between stages that these modes do not have: null.

Combinations that make no sense are refused before the model loads (`check`): anything that uses
earlier stages (every regularizer, a merge other than absorb, SLICE's projection against earlier
tasks, CorDA calibrated on previous tasks) has no earlier stage to use.
"""

from __future__ import annotations

from typing import Any

from ..data.tasks.base import TaskData
from ..infra.errors import ConfigError

MODES = ("sequential", "multitask", "independent")
JOINT_TASK = "multitask"  # the stage name of the joint stage (results.json stages[0].task)


def check_mode(mode: Any) -> str:
    """The mode name; ConfigError naming the valid ones otherwise."""
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is invalid; valid: {', '.join(MODES)}")
    return str(mode)


def check_plugins(mode: str, initializer: Any, regularizer: Any, merge: Any, initializer_cfg: Any = None) -> None:
    """Refuse plug-ins that need an earlier stage in a mode that has none (one-line ConfigError).

    Arguments are the built plug-ins (their `name`) and the initializer's config node."""
    if mode == "sequential":
        return
    why = (
        "multitask trains one stage on all tasks"
        if mode == "multitask"
        else "independent trains every task from the base model"
    )
    if regularizer.name != "none":
        raise ConfigError(
            f"mode={mode} with regularizer={regularizer.name}: {why}, so there is no earlier stage to "
            "regularize against or replay; use regularizer=none"
        )
    if merge.name != "absorb":
        raise ConfigError(
            f"mode={mode} with merge={merge.name}: {why}, so there are no task vectors to merge; use merge=absorb"
        )
    if initializer.name == "slice":
        raise ConfigError(
            f"mode={mode} with initializer=slice: {why}, so SLICE has no earlier task to project against "
            "(it would be LoRA-GA); use initializer=lora_ga"
        )
    if initializer_cfg is not None and initializer_cfg.get("calibration") == "previous":
        raise ConfigError(
            f"mode={mode} with initializer.calibration=previous: {why}, so there are no previous tasks; "
            "use initializer.calibration=current"
        )


def joint_task(tasks: list[TaskData]) -> TaskData:
    """The multitask stage's task: the union of every task's training split (each example keeps
    its own prompt, so the tasks stay distinguishable). Its eval split is the union too, but the
    runner evaluates the tasks one by one, never this union."""
    first = tasks[0]
    return TaskData(
        name=JOINT_TASK,
        metric=first.metric,
        train=[ex for t in tasks for ex in t.train],
        eval=[ex for t in tasks for ex in t.eval],
        origin="union of " + ", ".join(t.name for t in tasks),
        info={"tasks": [t.name for t in tasks]},
    )


def stage_tasks(mode: str, tasks: list[TaskData]) -> list[TaskData]:
    """What each stage trains on: every task in order, or the one joint task (multitask)."""
    return [joint_task(tasks)] if mode == "multitask" else list(tasks)


def evaluated(mode: str, stage: int, j: int, full_matrix: bool) -> bool:
    """Whether task j (0-based) is evaluated after `stage` (0 = before training). Row 0 and the
    multitask row are always full; without full_matrix a sequential run scores the tasks seen so
    far and an independent run only the task the stage trained."""
    if full_matrix or stage == 0 or mode == "multitask":
        return True
    return j < stage if mode == "sequential" else j == stage - 1

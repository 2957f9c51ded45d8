"""Observers: the moments a run reports, in order, and `python -m cl_bench.branch_cost` (a
subscriber of the runner, run end to end so that a change of the runner's moments fails here)."""

import json

import pytest

from cl_bench.run.observers import MOMENTS, Observer, Observers
from helpers import compose

# two synthetic tasks, two steps a stage, four examples evaluated per task
TINY = [
    "trainer.max_steps=2",
    "sequence.tasks=[sentiment,parity]",
    "sequence.n_train=16",
    "sequence.n_eval=4",
    "evaluation.max_new_tokens=4",
]
SMALL = ["general_eval=none", "progress=false", "threads=1", "sequence=synthetic", *TINY]


class Recorder(Observer):
    """Every moment as (name, stage, ...) with the arguments that identify it."""

    def __init__(self):
        self.seen = []

    def __getattribute__(self, name):
        if name in MOMENTS:
            return lambda *args: self.seen.append((name, *(a for a in args if isinstance(a, (int, str)))))
        return super().__getattribute__(name)


def test_observers_call_every_member_in_order_and_name_the_valid_moments():
    calls = []

    class One(Observer):
        def after_init(self, stage, stats, seconds):
            calls.append(("one", stage))

    class Two(Observer):
        def after_init(self, stage, stats, seconds):
            calls.append(("two", stage))

    group = Observers([One(), Observer(), Two()])
    group.after_init(3, {}, 0.5)
    assert calls == [("one", 3), ("two", 3)]
    with pytest.raises(AttributeError, match="not an observer moment; valid: before_run"):
        group.after_everything()


@pytest.mark.slow
def test_a_run_reports_its_moments_in_stage_order(tiny_model_dir, tmp_path):
    from cl_bench.run.runner import run

    recorder = Recorder()
    results = run(compose(SMALL), tmp_path, observers=[recorder])
    stage = lambda t, task: [  # noqa: E731
        ("before_stage", t, task),
        ("after_init", t),
        ("before_training", t, task, 2, 0),
        ("after_train_step", t, 1),
        ("after_train_step", t, 2),
        ("after_training", t),
        ("after_stage_trained", t),
    ]
    row = lambda t: [  # noqa: E731
        ("before_eval_row", t, 2),
        ("before_eval_task", t, 0, "sentiment"),
        ("after_eval_task", t, 0, "sentiment"),
        ("before_eval_task", t, 1, "parity"),
        ("after_eval_task", t, 1, "parity"),
        ("after_eval_row", t),
        ("after_stage_saved", t),
    ]
    assert recorder.seen == [
        ("before_run",),
        *row(0),
        *stage(1, "sentiment"),
        *row(1),
        *stage(2, "parity"),
        *row(2),
        ("after_run",),
    ]
    assert results["complete"]
    # a rerun of the finished run trains nothing and reports no moment
    again = Recorder()
    run(compose(SMALL), tmp_path, observers=[again])
    assert again.seen == []


@pytest.mark.slow
def test_branch_cost_runs_to_its_end_through_an_observer(tiny_model_dir, tmp_path, capsys):
    from cl_bench import branch_cost

    branch_cost.main(["--out", str(tmp_path), *TINY])
    rows = json.loads((tmp_path / "branch_cost.json").read_text())
    assert [(r["merge"], r["stage"]) for r in rows] == [("absorb", 1), ("absorb", 2), ("gainlora", 1), ("gainlora", 2)]
    for r in rows:
        assert (
            r["stage_cpu_s"] >= r["train_cpu_s"] > 0 and r["eval_cpu_s"] > 0 and r["s_per_step"] == r["train_cpu_s"] / 2
        )
        assert r["lora_mb"] > 0
    gainlora = [r for r in rows if r["merge"] == "gainlora"]
    assert [r["adapters"] for r in gainlora] == [1, 2] and gainlora[1]["gate_mb"] > 0  # a branch kept per stage
    assert "per-stage cost with the number of branches" in capsys.readouterr().out

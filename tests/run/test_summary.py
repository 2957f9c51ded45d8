"""The end-of-run summary, the per-task baselines, the stderr-to-log stream and held signals:
pure functions on hand-made inputs."""

import logging
import os
import signal

import pytest

from cl_bench.data.tasks.base import Example, TaskData
from cl_bench.evaluation.baselines import floor_of, task_baseline
from cl_bench.infra.console import StderrToLog
from cl_bench.infra.files import atomic_write_text
from cl_bench.infra.interrupt import Interrupted, InterruptGuard, critical
from cl_bench.run.summary import floor_warnings, format_summary


def results(**extra):
    base = {
        "sequence": "s",
        "tasks": ["task363", "cls", "gen"],
        "complete": True,
        "status": "complete",
        "matrix": [[0.0, 10.0, 0.0], [0.0, 50.0, 40.0], [0.0, 45.0, 30.0]],
        "baselines": {
            "task363": {"chance": None, "majority": None},
            "cls": {"chance": 50.0, "majority": 40.0},
            "gen": {"chance": None, "majority": None},
        },
        "stages": [
            {"stage": 1, "task": "task363", "init": {"projection": "skipped: no previous task", "fired": False}},
            {
                "stage": 2,
                "task": "cls",
                "init": {"projection": "fired", "fired": True, "cos_global": -0.25, "gamma": 0.125},
            },
        ],
        "metrics": {"AP": 30.0},
    }
    return base | extra


def test_floor_warnings_name_tasks_never_above_their_floor():
    warnings = floor_warnings(results())
    assert len(warnings) == 2
    assert warnings[0].startswith("task363: 0.0 in every row - the model cannot do this task; use a larger model")
    assert warnings[1].startswith("cls: never above its chance baseline (50.0) in any row (best 50.0)")


def test_summary_shows_baselines_projection_and_where_the_files_are(tmp_path):
    text = format_summary(results(), run_dir=tmp_path)
    assert "chance       n/a   50.0    n/a" in text and "majority     n/a   40.0    n/a" in text
    assert "  stage 1 (task363): skipped: no previous task" in text
    assert "  stage 2 (cls): fired [cos=-0.2500, gamma=0.125]" in text
    assert f"run dir:     {tmp_path}" in text and f"report:      python -m cl_bench.report {tmp_path}" in text
    assert "warnings:" in text
    assert "warnings:" not in format_summary(results(complete=False, status="running"))  # no verdict mid-run


def test_baselines_from_the_label_set_and_the_training_majority():
    ex = lambda i, t: Example(id=str(i), prompt=f"p{i}", target=t)  # noqa: E731
    task = TaskData(
        "t",
        "exact_match",
        train=[ex(0, "yes"), ex(1, "yes"), ex(2, "no")],
        eval=[ex(3, "yes"), ex(4, "no"), ex(5, "no"), ex(6, "no")],
        labels=["yes", "no"],
    )
    b = task_baseline(task)
    assert b == {"chance": 50.0, "majority": 25.0, "majority_answer": "yes"}
    assert task_baseline(task, limit=1)["majority"] == 100.0  # scored on the evaluated examples only
    free = TaskData("g", "rouge_l", train=[ex(0, "a b")], eval=[ex(1, "c")])
    assert task_baseline(free) == {"chance": None, "majority": None, "majority_answer": None}
    assert floor_of(b) == 50.0 and floor_of(None) == 0.0


def test_stderr_to_log_keeps_only_the_final_state_of_a_bar(caplog):
    stream = StderrToLog(logging.getLogger("third_party_test"))
    with caplog.at_level(logging.INFO, logger="third_party_test"):
        stream.write("bar  10%\rbar  50%\rbar 100%\n")
        stream.write("\r   \r")  # a bar that clears itself leaves nothing
        stream.write("a warning\nhalf")
    assert [r.getMessage() for r in caplog.records] == ["bar 100%", "a warning"]


def test_a_signal_during_an_atomic_write_waits_for_the_write(tmp_path):
    target = tmp_path / "f.txt"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs in a background job
    with pytest.raises(Interrupted) as info:
        with InterruptGuard(where=lambda: "stage 3 step 7"):
            with critical():
                os.kill(os.getpid(), signal.SIGINT)
                atomic_write_text(target, "complete")  # the handler ran, but holds the signal
            pytest.fail("the held signal must be raised when the write block ends")
    assert target.read_text() == "complete"
    assert info.value.exit_code == 130 and info.value.where == "stage 3 step 7"
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_sigterm_exits_143_naming_where_it_stopped():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        with InterruptGuard(where=lambda: "stage 0 evaluation (sentiment, before training)"):
            os.kill(os.getpid(), signal.SIGTERM)
            pytest.fail("SIGTERM must raise Interrupted")
    assert info.value.exit_code == 143 and info.value.where == "stage 0 evaluation (sentiment, before training)"
    assert signal.getsignal(signal.SIGTERM) is before


def test_session_keeps_third_party_output_off_the_console_and_in_the_log(tmp_path):
    import io
    import sys
    import warnings

    from cl_bench.infra.console import session

    console, log_file = io.StringIO(), tmp_path / "run.log"
    root = logging.getLogger()
    handlers = [logging.StreamHandler(console), logging.FileHandler(log_file)]
    old_level = root.level
    root.setLevel(logging.INFO)
    for h in handlers:
        root.addHandler(h)
    try:
        with session(verbose=False) as real_stderr:
            assert sys.stderr is not real_stderr
            logging.getLogger("cl_bench").info("stage 1/2 train a: 6 steps")
            logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
            warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=2)
            print("Running loglikelihood requests:  50%\rRunning loglikelihood requests: 100%", file=sys.stderr)
        assert sys.stderr is real_stderr
        with session(verbose=True) as stream:
            assert sys.stderr is stream
            logging.getLogger("lm_eval").warning("shown when verbose")
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()
        root.setLevel(old_level)
    assert console.getvalue() == "stage 1/2 train a: 6 steps\nshown when verbose\n"
    log = log_file.read_text()
    for line in ("stage 1/2 train a", "Retrying in 1s", "FutureWarning", "Running loglikelihood requests: 100%"):
        assert line in log, line
    assert "50%" not in log

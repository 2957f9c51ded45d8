"""Ctrl-C under a multi-process launcher: the ranks stop at a safe point and the run resumes; the
launcher (python -m cl_bench.launch, torchrun with cl_bench's exit codes) exits 130, not torchrun's
1, and the "interrupted" line is in the run's log as well as on the console."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from helpers import FAST, REPO, run_cli

JOB = [*FAST, "sequence.tasks=[sentiment,parity]", "trainer.max_steps=4", "trainer.checkpoint_every_steps=2"]


def test_the_launchers_exit_code_for_an_interrupted_job():
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from cl_bench.launch import interrupted_exit_code

    def failed(*codes):
        failures = {
            i: ProcessFailure(local_rank=i, pid=1000 + i, exitcode=c, error_file="") for i, c in enumerate(codes)
        }
        return ChildFailedError("cl_bench", failures)

    assert interrupted_exit_code(SignalException("ctrl-c", sigval=signal.SIGINT)) == 130
    assert interrupted_exit_code(SignalException("term", sigval=signal.SIGTERM)) == 143
    assert interrupted_exit_code(failed(130, 130)) == 130
    assert interrupted_exit_code(failed(130, -signal.SIGTERM)) == 143
    assert interrupted_exit_code(failed(130, 1)) is None  # a rank really failed: torchrun's code
    assert interrupted_exit_code(RuntimeError("x")) is None


def test_ctrl_c_of_one_process_is_in_the_log_too(tmp_path, tiny_model_dir):
    stopped = run_cli(
        [*JOB, f"hydra.run.dir={tmp_path}"], env_extra={"CL_BENCH_KILL_AT": "train:1:2", "CL_BENCH_KILL_SIGNAL": "INT"}
    )
    assert stopped.returncode == 130
    (line,) = stopped.stderr.strip().splitlines()
    assert line.startswith("cl_bench: interrupted during stage 1") and line in (tmp_path / "cl_bench.log").read_text()


@pytest.mark.slow
def test_ctrl_c_under_the_launcher_exits_130_and_the_rerun_resumes(tmp_path, tiny_model_dir):
    def launch(env_extra=None):
        cmd = [sys.executable, "-m", "cl_bench.launch", "--standalone", "--nproc-per-node", "2", "-m", "cl_bench"]
        cmd += ["distributed=ddp", *JOB, "threads=1", f"hydra.run.dir={tmp_path}"]
        env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    # a Ctrl-C at the terminal reaches torchrun's agent (the ranks run in sessions of their own)
    stopped = launch({"CL_BENCH_KILL_AT": "train:2:3", "CL_BENCH_KILL_SIGNAL": "INT", "CL_BENCH_KILL_PARENT": "1"})
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "cl_bench: interrupted during stage 2" in stopped.stderr
    assert "cl_bench: interrupted during stage 2" in (tmp_path / "cl_bench.log").read_text()
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["status"].startswith("interrupted during stage 2")
    resumed = launch()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["complete"]

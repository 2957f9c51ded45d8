"""Fault injection for crash-safety tests: CL_BENCH_KILL_AT=<point> makes the process SIGKILL
itself when it reaches that point (no cleanup, no flush: exactly what a pre-emption does).

Points: "train:<stage>:<step>" (after that optimizer step and any checkpoint),
"eval:<stage>:<task index>" (after that task's predictions are written),
"saved:<stage>" (right after results.json is written for that stage; saved:0 after row 0, the
evaluation before training). run/observers.KillPoints calls them.
CL_BENCH_KILL_SIGNAL=INT|TERM sends that signal instead (a Ctrl-C or a scheduler's SIGTERM).
CL_BENCH_KILL_PARENT=1 sends it to the parent process from local rank 0 only: under torchrun the
launcher's agent, which a Ctrl-C at the terminal reaches (the ranks run in sessions of their own).
CL_BENCH_SIGNAL_AT=<point> instead sends the scheduler's preemption signal (submitit's SIGUSR2,
or $SUBMITIT_PREEMPT_SIGNAL) once at that point: a job requeues itself as on a real preemption.
Unset in normal use; reading environment variables is their only cost.
"""

from __future__ import annotations

import os
import signal


def kill_point(point: str) -> None:
    if os.environ.get("CL_BENCH_KILL_AT") == point:
        sig = signal.Signals["SIG" + os.environ.get("CL_BENCH_KILL_SIGNAL", "KILL")]
        if os.environ.get("CL_BENCH_KILL_PARENT") == "1":
            if os.environ.get("LOCAL_RANK", "0") == "0":
                os.kill(os.getppid(), sig)
            return
        os.kill(os.getpid(), sig)
    if os.environ.get("CL_BENCH_SIGNAL_AT") == point:
        os.environ.pop("CL_BENCH_SIGNAL_AT")  # once per process
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")))

"""Fault injection for crash-safety tests: CL_BENCH_KILL_AT=<point> makes the process SIGKILL
itself when it reaches that point (no cleanup, no flush: exactly what a pre-emption does).

Points: "train:<stage>:<step>" (after that optimizer step and any checkpoint),
"eval:<stage>:<task index>" (after that task's predictions are written),
"saved:<stage>" (right after results.json is written for that stage).
CL_BENCH_KILL_SIGNAL=INT|TERM sends that signal instead (a Ctrl-C or a scheduler's SIGTERM).
Unset in normal use; reading one environment variable is its only cost.
"""
from __future__ import annotations

import os
import signal


def kill_point(point: str) -> None:
    if os.environ.get("CL_BENCH_KILL_AT") == point:
        os.kill(os.getpid(), signal.Signals["SIG" + os.environ.get("CL_BENCH_KILL_SIGNAL", "KILL")])

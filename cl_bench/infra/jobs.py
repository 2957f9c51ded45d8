"""One job of a sweep, as the process sees it: isolated from the jobs before it, and requeued on
preemption or timeout without losing a finished optimizer step.

Isolation. Hydra's basic launcher runs every job of a multirun in one process. `job_scope`
seeds every RNG from the job's seed on entry and, on exit, finishes what the job opened (the
W&B run, through `Job.on_exit`), restores the signal handlers, collects garbage and empties the
CUDA cache, so job k+1 sees the process as job 1 did.

Requeue. Under submitit (hydra/launcher=slurm or local_jobs) the scheduler warns a job with a
signal (SIGUSR2, `signal_delay_s` before the kill). submitit's handler then calls the launcher's
`checkpoint` (hydra-submitit-launcher returns a DelayedSubmission of the same job: same
overrides, same job number, same master config with its resolved `${now:...}`, hence the same
run dir), requeues it and exits at once, wherever the job happened to be. `Job` defers that
handler to the runner's next safe point (after an optimizer step, or after a stage is saved):
the runner writes an in-stage checkpoint there, then submitit's handler runs. If no safe point
comes within the grace period (a long evaluation or initialisation), the handler runs anyway
and the job resumes from the last saved step. The requeued job reopens the same run dir, where
the runner resumes from results.json and the in-stage checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("cl_bench")

DEFAULT_GRACE_S = 60


class Requeued(SystemExit):
    """The job checkpointed, was requeued and exits; the process status is submitit's code."""

    def __str__(self) -> str:
        return f"requeued after preemption or timeout (exit code {self.code})"


class Job:
    """Per-job hooks the runner calls: `safe_point` after each optimizer step and each saved
    stage, `on_exit` for what must be closed however the job ends."""

    def __init__(self, grace_s: float | None = None):
        self.grace_s = grace_s if grace_s is not None else _grace_from_env()
        self._sig: int | None = None
        self._submitit_handler: Any = None
        self._pending: tuple[int, Any] | None = None
        self._previous_alarm: Any = None
        self._exit_hooks: list[Callable[[BaseException | None], None]] = []

    # ---- preemption -------------------------------------------------------------------------
    @property
    def preemptible(self) -> bool:
        """True when a submitit signal handler was found and deferred."""
        return self._submitit_handler is not None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def install(self, sig: int | None = None, handler: Any = None) -> Job:
        """Defer submitit's preemption handler (found automatically; `sig`/`handler` for tests)."""
        if sig is None:
            sig, handler = _submitit_signal_handler()
        if sig is None or threading.current_thread() is not threading.main_thread():
            return self
        self._sig, self._submitit_handler = sig, handler
        signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        if self._sig is not None:
            signal.signal(self._sig, self._submitit_handler)
        if self._previous_alarm is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous_alarm)
        self._sig = self._submitit_handler = self._pending = self._previous_alarm = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._pending is not None:
            return
        self._pending = (signum, frame)
        log.warning(
            "signal %s (preemption or timeout): saving at the next step boundary, then requeueing (at most %.0f s)",
            signal.Signals(signum).name,
            self.grace_s,
        )
        self._previous_alarm = signal.signal(signal.SIGALRM, self._on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(self.grace_s, 0.001))

    def _on_alarm(self, signum: int, frame: Any) -> None:
        log.warning("no step boundary within %.0f s: requeueing from the last saved step", self.grace_s)
        self._hand_over()

    def safe_point(self, save: Callable[[], None] | None = None) -> None:
        """Called where the run's state is consistent. If a preemption signal is pending: cancel
        the grace timer, `save()` (an in-stage checkpoint), then let submitit checkpoint the
        launcher and requeue; raises Requeued. Otherwise does nothing."""
        if self._pending is None:
            return
        signal.setitimer(signal.ITIMER_REAL, 0)
        if save is not None:
            save()
            log.info("in-stage checkpoint written for the requeue")
        self._hand_over()

    def _hand_over(self) -> None:
        signum, frame = self._pending
        # Close what the job opened (W&B marked preempting) before the scheduler may kill us.
        self.run_exit_hooks(Requeued(None))
        try:
            self._submitit_handler(signum, frame)  # checkpoint() -> pickle -> requeue -> sys.exit
        except SystemExit as exc:
            raise Requeued(exc.code) from None
        self._pending = None  # the handler chose not to exit (e.g. not the rank-0 task): carry on

    # ---- cleanup ----------------------------------------------------------------------------
    def on_exit(self, hook: Callable[[BaseException | None], None]) -> None:
        """`hook(exc)` runs when the job ends (exc None on success), before memory is freed."""
        self._exit_hooks.append(hook)

    def run_exit_hooks(self, exc: BaseException | None) -> None:
        for hook in reversed(self._exit_hooks):
            try:
                hook(exc)
            except Exception as err:  # cleanup must not hide the job's own outcome
                log.warning("cleanup after the job failed: %s", err)
        self._exit_hooks.clear()


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and every CUDA device) RNGs from one seed."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def job_scope(seed: int) -> Iterator[Job]:
    """Run one job: seeds set, preemption deferred (under submitit), and on exit the job's
    resources released whatever happened (see the module docstring)."""
    seed_everything(seed)
    job = Job().install()
    exc: BaseException | None = None
    try:
        yield job
    except BaseException as err:
        exc = err
        raise
    finally:
        job.run_exit_hooks(exc)
        job.uninstall()
        free_memory()


def _grace_from_env() -> float:
    """Half the scheduler's warning time: hydra/launcher=slurm exports CL_BENCH_SIGNAL_DELAY_S
    (its signal_delay_s); submitit's local executor exports SUBMITIT_LOCAL_SIGNAL_DELAY_S."""
    for var in ("CL_BENCH_SIGNAL_DELAY_S", "SUBMITIT_LOCAL_SIGNAL_DELAY_S"):
        value = os.environ.get(var)
        if value:
            try:
                return max(1.0, float(value) / 2)
            except ValueError:
                pass
    return DEFAULT_GRACE_S


def _submitit_signal_handler() -> tuple[int | None, Any]:
    """(signal, handler) when this process is a submitit job whose handler is installed."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None, None
    from submitit.core.job_environment import JobEnvironment, SignalHandler

    sig = JobEnvironment._usr_sig()
    handler = signal.getsignal(sig)
    if isinstance(getattr(handler, "__self__", None), SignalHandler):
        return sig, handler
    return None, None


# ---- CPU threads ---------------------------------------------------------------------------
def usable_cpus() -> tuple[int, str]:
    """(CPUs this process may use, where that number comes from): its CPU affinity (what
    taskset / cgroups cpusets / SLURM bind it to), or SLURM_CPUS_PER_TASK when smaller."""
    try:
        n, source = len(os.sched_getaffinity(0)), "CPU affinity"
    except (AttributeError, OSError):  # not on Linux
        n, source = os.cpu_count() or 1, "CPU count"
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and 0 < int(slurm) < n:
        n, source = int(slurm), "SLURM_CPUS_PER_TASK"
    return max(1, n), source


def cpu_threads(configured: Any) -> tuple[int, str]:
    """(torch intra-op threads for this job, why). `configured` is the config's `threads`
    (which the launcher presets fill from CL_BENCH_THREADS: one per parallel local job,
    cpus_per_task on SLURM); None = the CPUs this process may use (usable_cpus), because torch's
    own default counts the machine's cores and oversubscribes a shared node or a small
    allocation (five jobs on two cores built the tiny model in 539 s instead of 16 s)."""
    if configured is not None:
        via = "CL_BENCH_THREADS" if os.environ.get("CL_BENCH_THREADS") == str(configured) else "threads"
        return int(configured), f"{via}={configured}"
    n, source = usable_cpus()
    return n, f"the CPUs this process may use ({source})"

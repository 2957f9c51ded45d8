"""What the terminal shows during a run, and where everything else goes.

The console shows cl_bench's own lines (one per finished phase: stage i/T training with its loss
terms, evaluation with the row, GP/IP per benchmark) and, on a terminal, one named progress bar
for the phase in progress. Everything third-party libraries print (lm-eval and datasets bars and
log lines, Hub retry warnings, transformers' FutureWarnings, unnamed tqdm bars) goes to the run's
log file instead, as INFO records; `verbose=true` leaves all of it on the console as well.
The run dir's log file (Hydra's file handler) keeps every line.
"""

from __future__ import annotations

import io
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

log = logging.getLogger("cl_bench")
THIRD_PARTY = logging.getLogger("third_party")  # records of what libraries wrote to stderr
LIBRARY_LOGGERS = ("transformers", "huggingface_hub", "datasets", "peft", "accelerate")
HEARTBEAT_S = 60.0  # without a terminal (SLURM logs), one progress line per minute of a phase
FILE_ONLY = {"console": False}  # `log.info(msg, extra=FILE_ONLY)`: the run's log file only


class OwnRecords(logging.Filter):
    """Lets through cl_bench's records (loggers named cl_bench or cl_bench.*), except those marked FILE_ONLY."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == "cl_bench" or record.name.startswith("cl_bench.")
        return own and getattr(record, "console", True)


class StderrToLog(io.TextIOBase):
    """A stand-in for sys.stderr that turns each finished line into an INFO record of logger
    `third_party`. A progress bar's in-place redraws (text before the last carriage return) are
    dropped: only the state it ends in is kept."""

    def __init__(self, logger: logging.Logger = THIRD_PARTY):
        self.logger = logger
        self.buffer_ = ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        self.buffer_ += text
        *lines, self.buffer_ = self.buffer_.split("\n")
        for line in lines:
            line = line.rsplit("\r", 1)[-1].strip()
            if line:
                self.logger.info(line)
        self.buffer_ = self.buffer_[-10_000:]  # bars that never end a line must not grow without bound
        return len(text)

    def flush(self) -> None:
        pass


@contextmanager
def session(verbose: bool = False) -> Iterator[TextIO]:
    """Routes third-party output to the log for the duration of a run; yields the real stderr
    (for cl_bench's own progress bars). Call it after Hydra has configured logging for the job."""
    real_stderr = sys.stderr
    if verbose:
        yield real_stderr
        return
    root = logging.getLogger()
    changed = []
    own = OwnRecords()
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            changed.append((handler, handler.formatter))
            handler.addFilter(own)
            handler.setFormatter(logging.Formatter("%(message)s"))
    library_state = _route_library_loggers()
    sys.stderr = StderrToLog()
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each distinct warning once, into the log
            yield real_stderr
    finally:
        logging.captureWarnings(False)
        sys.stderr = real_stderr
        for logger, handlers, propagate in library_state:
            for h in handlers:
                logger.addHandler(h)
            logger.propagate = propagate
        for handler, formatter in changed:
            handler.removeFilter(own)
            handler.setFormatter(formatter)


def _route_library_loggers() -> list[tuple[logging.Logger, list[logging.Handler], bool]]:
    """Libraries that print through their own stderr handler (transformers, huggingface_hub)
    instead propagate to the root logger, whose file handler keeps them."""
    import huggingface_hub.utils.logging  # noqa: F401  (creates the library loggers and their handlers now)
    import transformers.utils.logging as tlog

    tlog.disable_progress_bar()  # "Loading weights" bars
    state = []
    for name in LIBRARY_LOGGERS:
        if name not in logging.Logger.manager.loggerDict:
            continue
        logger = logging.getLogger(name)
        handlers = [
            h
            for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]
        for h in handlers:
            logger.removeHandler(h)
        state.append((logger, handlers, logger.propagate))
        logger.propagate = True
    return state


class Progress:
    """One display per phase of a run: training (stage i/T, task, step, loss terms), evaluation
    (one task after another), general evaluation (GP/IP per benchmark). A tqdm bar on a
    terminal; one line per finished phase always. `where()` names the current point for
    interruption messages."""

    def __init__(self, n_stages: int, stream: TextIO | None = None, bars: bool = True):
        self.T = n_stages
        self.stream = stream or sys.stderr
        self.bars = bars and bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        self.phase, self.stage, self.task, self.step, self.total = "setup", 0, None, None, None
        self.t0 = self.beat = time.time()
        self.scores: list[tuple[str, float]] = []

    # ---- where are we ----------------------------------------------------------------------
    def where(self) -> str:
        if self.phase == "train":
            return f"stage {self.stage} step {self.step or 0} (training {self.task})"
        if self.phase == "eval":
            after = "before training" if self.stage == 0 else f"after stage {self.stage}"
            return f"stage {self.stage} evaluation ({self.task}, {after})"
        if self.phase == "general":
            return f"stage {self.stage} general evaluation"
        if self.phase == "init":
            return f"stage {self.stage} init ({self.task})"
        if self.phase == "done":
            return f"the end of stage {self.stage}"
        return "setup (before the first stage)"

    def _open_bar(self, total: int, initial: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self._close_bar()
        if self.bars:
            self.bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream, leave=False, dynamic_ncols=True)
        self.t0 = self.beat = time.time()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _heartbeat(self, text: str) -> None:
        if not self.bars and time.time() - self.beat >= HEARTBEAT_S:
            self.beat = time.time()
            log.info(text)

    # ---- training --------------------------------------------------------------------------
    def init_begin(self, stage: int, task: str) -> None:
        self.phase, self.stage, self.task, self.step = "init", stage, task, None

    def init_log(self, message: str) -> None:
        """An initializer's own messages (captures, cache keys): the log file only."""
        log.info(message, extra=FILE_ONLY)

    def init_end(self, stats: dict[str, Any], seconds: float) -> None:
        """One line for inits that did something: the method, whether a projection fired (cos, gamma)."""
        method, projection = stats.get("method"), stats.get("projection")
        if method is None or (projection is None and not stats.get("capture") and seconds < 1.0):
            return  # e.g. PEFT's default init: nothing worth a line
        parts = [str(projection)] if projection is not None else []
        if stats.get("cos_global") is not None:
            parts.append(f"cos {stats['cos_global']:+.4f}")
        if stats.get("gamma") is not None:
            parts.append(f"gamma {stats['gamma']:.4g}")
        log.info(f"stage {self.stage}/{self.T} init {method}: {', '.join(parts) or 'done'} ({seconds:.1f}s)")

    def train_begin(self, stage: int, task: str, total: int, start: int = 0) -> None:
        self.phase, self.stage, self.task, self.step, self.total = "train", stage, task, start, total
        self._open_bar(total, start, f"stage {stage}/{self.T} train {task}")

    def train_step(self, step: int, terms: dict[str, float]) -> None:
        self.step = step
        shown = {k: v for k, v in terms.items() if k not in ("grad_norm", "lr")}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()}, refresh=False)
            self.bar.update(step - self.bar.n)
        self._heartbeat(
            f"stage {self.stage}/{self.T} train {self.task}: step {step}/{self.total} "
            + " ".join(f"{k}={v:.3f}" for k, v in shown.items())
        )

    def train_end(self, summary: dict[str, Any]) -> None:
        self._close_bar()
        first, last = summary.get("loss_first") or {}, summary.get("loss_last") or {}
        terms = ", ".join(
            f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in last if k in first and k not in ("grad_norm", "lr")
        )
        log.info(
            f"stage {self.stage}/{self.T} train {self.task}: {summary.get('steps')} steps in "
            f"{time.time() - self.t0:.1f}s, {terms}"
        )

    # ---- evaluation ------------------------------------------------------------------------
    def eval_begin(self, stage: int, n_tasks: int) -> None:
        self.phase, self.stage, self.task, self.scores = "eval", stage, None, []
        self._open_bar(n_tasks, 0, f"stage {stage}/{self.T} eval")

    def eval_task_begin(self, task: str) -> None:
        self.task = task
        if self.bar is not None:
            self.bar.set_postfix_str(task)

    def eval_task_end(self, task: str, score: float) -> None:
        self.scores.append((task, score))
        if self.bar is not None:
            self.bar.update(1)
        self._heartbeat(f"stage {self.stage}/{self.T} eval: {task} {score:.1f}")

    def eval_end(self) -> None:
        self._close_bar()
        row = " | ".join(f"{t} {s:.1f}" for t, s in self.scores)
        log.info(f"stage {self.stage}/{self.T} eval: {row}  ({time.time() - self.t0:.1f}s)")
        self.phase = "done"

    def general_begin(self, stage: int) -> None:
        self.phase, self.stage, self.task = "general", stage, None
        self.t0 = time.time()
        log.info(f"stage {stage}/{self.T} general: lm-eval running (details in the log file)")

    def general_end(self, result: dict[str, Any]) -> None:
        zs, fs = result.get("zero_shot") or {}, result.get("few_shot") or {}
        sets = result.get("benchmarks") or {}
        head = []
        for name, scores, key in (("GP", zs, "gp"), ("IP", fs, "ip")):
            chosen = [scores[b] for b in sets.get(key, []) if scores.get(b) is not None]
            if chosen and len(chosen) == len(sets.get(key, [])):
                head.append(f"{name} {sum(chosen) / len(chosen):.1f}")
        per = " | ".join(f"{b} {_pct(zs.get(b))}/{_pct(fs.get(b))}" for b in dict.fromkeys([*zs, *fs]))
        log.info(
            f"stage {self.stage}/{self.T} general: {', '.join(head)} | {per} (zero-/few-shot, "
            f"{time.time() - self.t0:.1f}s)"
        )
        self.phase = "done"

    def close(self) -> None:
        self._close_bar()


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"

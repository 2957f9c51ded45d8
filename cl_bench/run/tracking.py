"""Optional Weights & Biases logging (logger=wandb). results.json stays the source of truth;
W&B mirrors it for dashboards. No secret (API key, HF token) is ever put in a config or logged:
wandb reads its key from its own environment.

One W&B run per cl_bench run dir:
- run id = a stable hash of the run dir's absolute path, with resume="allow": a job that is
  requeued, killed and resumed, or rerun on the same dir continues the same W&B run;
- group = the sweep dir's name in a multirun (all jobs of one sweep together), job_type = the
  method (initializer/regularizer/merge choices), config = the resolved run config;
- per step: every loss term by name (train/<term>, x-axis train/global_step);
- per stage: the row of R (eval/<task>), AP/FP/Fgt of the tasks so far, the GP/IP benchmarks when measured
  (x-axis stage);
- at the end: summary metrics (AP, FP, Fgt, ..., GP, IP), R as a table and two heatmaps, the
  stability-plasticity point (AP, FP) as a table and a plot, the loss curves.
Offline (WANDB_MODE=offline or logger.mode=offline) writes DIR/wandb/offline-run-*; upload later
with `wandb sync DIR/wandb/offline-run-*` (several dirs of one resumed run sync in order).

A kill -9 loses what wandb had buffered since the run was last closed (offline, its whole history
file: wandb writes it in blocks, and nothing flushes it before `finish`). So each close records
in DIR/wandb/cl_bench_logged.json the rows and steps W&B now holds (after `finish` returned), and
a resumed run, and every stage end, re-logs what results.json holds beyond that: the saved rows
of R and the loss (`train/lm`, results.json's loss curve; the other terms of those steps are not
kept). Steps W&B already holds are not logged twice when an exactly resumed stage reruns them;
what wandb happened to write before a kill may appear twice (the same row of R; a loss rounded to
5 digits, as results.json keeps it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from statistics import fmean
from typing import Any

from ..infra.files import atomic_write_json

METRIC_KEYS = ("AP", "FP", "Fgt", "BWT", "FWT", "FR", "Acc", "AAA", "GP", "IP")


def run_id(run_dir: str | Path) -> str:
    """W&B run id of a run dir: 16 hex chars of SHA-256 of its absolute path (stable across
    processes, requeues and resumes; W&B ids allow [a-z0-9_-])."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def sweep_context() -> dict[str, Any]:
    """What Hydra knows about this job: mode, sweep dir, group choices (empty outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
        return {
            "multirun": str(hc.mode) == "RunMode.MULTIRUN",
            "sweep_dir": str(hc.sweep.dir),
            "choices": dict(hc.runtime.choices),
        }
    except Exception:  # a bare call (tests, scripts): no Hydra context
        return {}


def method_name(config: Mapping[str, Any], choices: Mapping[str, Any]) -> str:
    """initializer/regularizer/merge as chosen (Hydra choice names; class names otherwise)."""

    def pick(group: str) -> str:
        choice = choices.get(group)
        if choice:
            return str(choice)
        target = str((config.get(group) or {}).get("_target_", "?"))
        return target.rsplit(".", 1)[-1].lower()

    init = choices.get("experiment/method") or pick("initializer")
    return f"{init}/{pick('regularizer')}/{pick('merge')}"


class NullTracker:
    def log_step(self, stage: int, step: int, terms: Mapping[str, float]) -> None: ...
    def log_stage(self, stage: int, results: Mapping[str, Any]) -> None: ...
    def finish(self, results: Mapping[str, Any]) -> None: ...
    def close(self, exit_code: int = 1, preempted: bool = False) -> None: ...


class WandbTracker(NullTracker):
    def __init__(self, logger_cfg, results: Mapping[str, Any], run_dir: str | Path):
        import wandb

        self.wandb = wandb
        run_dir = Path(run_dir).resolve()
        config = dict(results["config"])
        ctx = sweep_context()
        choices = ctx.get("choices", {})
        group = logger_cfg.get("group") or (Path(ctx["sweep_dir"]).name if ctx.get("multirun") else None)
        job_type = logger_cfg.get("job_type") or method_name(config, choices)
        seed = config.get("seed")
        lora = config.get("lora") or {}
        name = (
            logger_cfg.get("name")
            or f"{results['sequence']} {job_type.split('/')[0]} r{lora.get('r')} a{lora.get('alpha')} s{seed}"
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=logger_cfg.get("project") or "cl_bench",
            entity=logger_cfg.get("entity"),
            id=logger_cfg.get("id") or run_id(run_dir),
            resume="allow",
            name=name,
            group=group,
            job_type=job_type,
            tags=list(logger_cfg.get("tags") or []),
            config=config | {"run_dir": str(run_dir)},
            dir=str(run_dir),
            mode=logger_cfg.get("mode"),
            reinit="finish_previous",
        )
        self.run.define_metric("train/global_step")
        self.run.define_metric("train/*", step_metric="train/global_step")
        self.run.define_metric("stage")
        for prefix in ("eval/*", "general/*"):
            self.run.define_metric(prefix, step_metric="stage")
        # Steps of finished stages: a resumed run continues the global step where it stopped.
        self.offset = _steps_done(results)
        self.ledger = run_dir / "wandb" / LEDGER
        self.confirmed = read_ledger(self.ledger, self.run.id)  # what W&B holds from earlier processes
        self.rows: set[int] = set()  # rows of R / global steps this process logged
        self.steps: set[int] = set()
        self.catch_up(results)

    def log_step(self, stage: int, step: int, terms: Mapping[str, float]) -> None:
        global_step = self.offset + step
        if global_step <= self.confirmed["global_step"]:
            return  # W&B holds it: an exactly resumed stage reruns the steps after its checkpoint
        row = {f"train/{k}": float(v) for k, v in terms.items()}
        self.run.log(row | {"train/global_step": global_step, "train/stage": stage})
        self.steps.add(global_step)

    def log_stage(self, stage: int, results: Mapping[str, Any]) -> None:
        """Row `stage` of R as saved in results.json, with what W&B lacks before it."""
        self.catch_up(results)
        self.offset = _steps_done(results)

    def catch_up(self, results: Mapping[str, Any]) -> None:
        """Log, in order, the saved rows of R and the steps of finished stages (their loss) that
        W&B neither held when this process started nor got from it."""
        for stage, global_step, loss in saved_history(results):
            if global_step is None:
                if stage > self.confirmed["stage"] and stage not in self.rows:
                    self._log_row(stage, results)
            elif global_step > self.confirmed["global_step"] and global_step not in self.steps:
                self.run.log({"train/lm": loss, "train/global_step": global_step, "train/stage": stage})
                self.steps.add(global_step)

    def _log_row(self, stage: int, results: Mapping[str, Any]) -> None:
        """Row `stage` of R (0 = before training), its mean over the tasks seen so far, and the
        general benchmarks evaluated at this stage."""
        tasks, row = results["tasks"], results["matrix"][stage]
        values: dict[str, Any] = {f"eval/{t}": v for t, v in zip(tasks, row) if v is not None}
        seen = [v for v in row[:stage] if v is not None]
        diag = [results["matrix"][i][i - 1] for i in range(1, stage + 1)]
        if stage and len(seen) == stage and None not in diag and results.get("mode", "sequential") == "sequential":
            # The metrics of the sequence so far (tasks 1..stage): FP and AP as if it ended here.
            values["eval/just_trained"] = row[stage - 1]
            values["eval/FP_so_far"] = fmean(seen)
            values["eval/AP_so_far"] = fmean(diag)
            values["eval/Fgt_so_far"] = values["eval/AP_so_far"] - values["eval/FP_so_far"]
        general = (results.get("general") or {}).get(str(stage)) or {}
        for kind in ("zero_shot", "few_shot"):
            for bench, v in (general.get(kind) or {}).items():
                if isinstance(v, (int, float)):
                    values[f"general/{kind}/{bench}"] = v
        self.run.log(values | {"stage": stage})
        self.rows.add(stage)

    def finish(self, results: Mapping[str, Any]) -> None:
        from ..report import figures as plots

        wandb = self.wandb
        metrics = results.get("metrics") or {}
        for k in METRIC_KEYS:
            if metrics.get(k) is not None:
                self.run.summary[k] = metrics[k]
        tasks = list(results["tasks"])
        matrix = wandb.Table(
            columns=["after stage", *tasks], data=[[i, *row] for i, row in enumerate(results["matrix"])]
        )
        point = wandb.Table(
            columns=["run", "sequence", "method", "AP", "FP", "GP", "IP"],
            data=[
                [
                    self.run.name,
                    results["sequence"],
                    self.run.job_type,
                    metrics.get("AP"),
                    metrics.get("FP"),
                    metrics.get("GP"),
                    metrics.get("IP"),
                ]
            ],
        )
        images = {
            "plots/R": plots.heatmap(results),
            "plots/R_relative": plots.heatmap(results, relative=True),
            "plots/stability_plasticity": plots.stability_plasticity(
                [{"label": self.run.name, "AP": metrics.get("AP"), "FP": metrics.get("FP")}],
                title=f"{results['sequence']}: FP vs AP",
            ),
            "plots/loss": plots.loss_curves(results),
        }
        logged: dict[str, Any] = {"tables/R": matrix, "tables/AP_FP": point}
        for key, fig in images.items():
            logged[key] = wandb.Image(_pil(plots.png_bytes(fig)))
        self.run.log(logged)
        self.close(exit_code=0)

    def close(self, exit_code: int = 1, preempted: bool = False) -> None:
        """Finish the W&B run (idempotent). A preempted job marks it so before it is requeued."""
        if self.run is None:
            return
        if preempted:
            self.run.mark_preempting()
        run_id_ = self.run.id
        self.run.finish(exit_code=exit_code)  # returns once wandb has written / sent everything
        self.run = None
        confirmed = {
            "id": run_id_,
            "stage": _contiguous(self.confirmed["stage"], self.rows),
            "global_step": _contiguous(self.confirmed["global_step"], self.steps),
        }
        atomic_write_json(self.ledger, confirmed)


LEDGER = "cl_bench_logged.json"


def read_ledger(path: Path, run_id_: str) -> dict[str, Any]:
    """What the W&B run `run_id_` held when it was last closed: {"stage": the last row of R of an
    unbroken run 0..stage (-1: none), "global_step": likewise of the training steps (0: none)}.
    Missing, unreadable or of another W&B run: nothing."""
    import json

    try:
        ledger = json.loads(path.read_text())
        if ledger.get("id") == run_id_:
            return {"stage": int(ledger["stage"]), "global_step": int(ledger["global_step"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return {"stage": -1, "global_step": 0}


def saved_history(results: Mapping[str, Any]):
    """What results.json holds for W&B, in the order it happened: (stage, None, None) for each
    saved row of R (row 0 once complete), (stage, global step, loss) for each step of a finished
    stage (global steps count from 1 over the whole run)."""
    if all(v is not None for v in results["matrix"][0]):
        yield 0, None, None
    offset = 0
    for record in results.get("stages", []):
        train = record.get("train") or {}
        for step, loss in enumerate(train.get("loss_curve") or [], 1):
            yield record["stage"], offset + step, loss
        offset += int(train.get("steps") or 0)
        yield record["stage"], None, None


def _contiguous(start: int, done: set[int]) -> int:
    """The end of the unbroken run start+1, start+2, ... in `done`."""
    while start + 1 in done:
        start += 1
    return start


def _steps_done(results: Mapping[str, Any]) -> int:
    return sum(int((s.get("train") or {}).get("steps") or 0) for s in results.get("stages", []))


def _pil(png: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png))


def make_tracker(logger_cfg, results: Mapping[str, Any], run_dir: str | Path) -> NullTracker:
    if logger_cfg.get("wandb"):
        return WandbTracker(logger_cfg, results, run_dir)
    return NullTracker()

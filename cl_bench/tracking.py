"""Optional Weights & Biases logging (logger=wandb). results.json stays the source of truth;
W&B gets per-step loss terms, per-stage rows and the final metrics. No secret (API key, HF
token) is ever put in a config or logged: wandb reads its key from its own environment."""
from __future__ import annotations

from typing import Any


class NullTracker:
    def log_step(self, stage: int, step: int, terms: dict[str, float]) -> None: ...
    def log_stage(self, stage: int, row: list, tasks: list[str]) -> None: ...
    def finish(self, metrics: dict[str, Any]) -> None: ...


class WandbTracker(NullTracker):
    def __init__(self, logger_cfg, config: dict, run_dir: str, name: str):
        import wandb

        self.wandb = wandb
        self.step = 0
        self.run = wandb.init(
            project=logger_cfg.get("project", "cl_bench"), entity=logger_cfg.get("entity"), name=name,
            config=config, dir=run_dir, mode=logger_cfg.get("mode"), reinit="finish_previous",
        )

    def log_step(self, stage: int, step: int, terms: dict[str, float]) -> None:
        self.step += 1
        self.run.log({f"train/{k}": v for k, v in terms.items()} | {"stage": stage}, step=self.step)

    def log_stage(self, stage: int, row: list, tasks: list[str]) -> None:
        values = {f"eval/{t}": v for t, v in zip(tasks, row) if v is not None}
        self.run.log(values | {"stage": stage}, step=self.step)

    def finish(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            self.run.summary[k] = v
        self.run.finish()


def make_tracker(logger_cfg, config: dict, run_dir: str, name: str) -> NullTracker:
    if logger_cfg.get("wandb"):
        return WandbTracker(logger_cfg, config, run_dir, name)
    return NullTracker()

"""The run directory as a resume point: lock, config check, stage files, in-stage checkpoints.

Layout (shared/DESIGN.md §3):
  results.json                         single source of truth, rewritten atomically
  stages/stage_XX/adapter.safetensors  trained LoRA factors (A, B) of stage XX
  stages/stage_XX/init.safetensors     initial factors that were absorbed (when any)
  stages/stage_XX/model_state.safetensors  target weights after the merge (only the latest kept)
  stages/stage_XX/checkpoint/          in-stage checkpoint (adapter, optimizer, scheduler, RNG, step)
  predictions/stage_XX/<task>.jsonl    one scored example per line
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .results import atomic_save_tensors, atomic_write_json, load_tensors

# Keys that do not change results: a resumed run may differ in these.
NON_RESULT_KEYS = ("progress", "verbose", "logger", "cache", "threads")


class RunLock:
    """An exclusive flock on DIR/.lock; the OS releases it when the process dies, even on SIGKILL."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fh = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise ConfigError(f"run dir {self.path.parent} is in use by pid {holder}; wait for it or choose another hydra.run.dir") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.fh:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(old: dict, new: dict) -> list[str]:
    a = {k: v for k, v in _flatten(old).items() if k.split(".")[0] not in NON_RESULT_KEYS}
    b = {k: v for k, v in _flatten(new).items() if k.split(".")[0] not in NON_RESULT_KEYS}
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))


def load_previous_results(run_dir: Path, config: dict) -> dict | None:
    """results.json of an earlier run in this dir, after checking it holds the same config."""
    path = Path(run_dir) / "results.json"
    if not path.exists():
        return None
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg}); move it away to start afresh") from None
    diff = config_differences(previous.get("config", {}), config)
    if diff:
        shown = ", ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")
        raise ConfigError(f"run dir {run_dir} holds a run with a different config (keys: {shown}); use another hydra.run.dir")
    return previous


class StageFiles:
    def __init__(self, run_dir: Path, stage: int):
        self.dir = Path(run_dir) / "stages" / f"stage_{stage:02d}"
        self.adapter = self.dir / "adapter.safetensors"
        self.init = self.dir / "init.safetensors"
        self.model_state = self.dir / "model_state.safetensors"
        self.regularizer = self.dir / "regularizer.safetensors"
        self.checkpoint = self.dir / "checkpoint"


def factors_to_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, (A, B) in factors.items():
        out[f"{name}.A"] = A
        out[f"{name}.B"] = B
    return out


def target_weights(model: torch.nn.Module, target_modules: list[str]) -> dict[str, torch.Tensor]:
    """Weights of the LoRA target Linears: the only base weights a stage changes."""
    out = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in target_modules and isinstance(module, torch.nn.Linear):
            out[f"{name}.weight"] = module.weight
    return out


def save_model_state(files: StageFiles, model, target_modules: list[str]) -> None:
    atomic_save_tensors(files.model_state, target_weights(model, target_modules))


@torch.no_grad()
def load_model_state(files: StageFiles, model, target_modules: list[str]) -> None:
    saved = load_tensors(files.model_state)
    current = target_weights(model, target_modules)
    if saved.keys() != current.keys():
        raise ConfigError(f"{files.model_state} does not match the model's target modules; use another hydra.run.dir")
    for k, w in current.items():
        w.copy_(saved[k])


# ---- in-stage checkpoints ------------------------------------------------------------------

def save_checkpoint(files: StageFiles, model, state, optimizer, scheduler) -> None:
    """Adapter, optimizer and scheduler state, RNG states and the step; the JSON goes last and
    marks the checkpoint complete."""
    ckpt = files.checkpoint
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    atomic_save_tensors(ckpt / "trainable.safetensors", trainable)
    opt_state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in opt_state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    atomic_save_tensors(ckpt / "optimizer.safetensors", tensors)
    meta = {
        "step": state.step, "losses": state.losses, "param_groups": opt_state["param_groups"],
        "scalars": scalars, "scheduler": scheduler.state_dict(),
    }
    atomic_write_json(ckpt / "state.json", meta)


def load_checkpoint(files: StageFiles, model) -> tuple[Any, dict] | None:
    """(TrainState, optimizer/scheduler state) from an in-stage checkpoint, or None."""
    from .training import TrainState

    ckpt = files.checkpoint
    if not (ckpt / "state.json").exists():
        return None
    meta = json.loads((ckpt / "state.json").read_text())
    trainable = load_tensors(ckpt / "trainable.safetensors")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(trainable[n])
    tensors = load_tensors(ckpt / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.cpu"))
    if "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors.pop("rng.cuda"))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt_state = {"state": state, "param_groups": meta["param_groups"]}
    return TrainState(step=meta["step"], losses=meta["losses"]), {"optimizer": opt_state, "scheduler": meta["scheduler"]}

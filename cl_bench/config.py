"""Config checks that run before any model is loaded; each failure is a one-line ConfigError."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "initializer", "sequence", "regularizer", "merge", "trainer", "evaluation", "general_eval", "logger",
          "experiment", "experiment/method")


def group_choices(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def check_group_overrides(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """`group=choice` overrides must name an existing YAML (Hydra's own error is many lines)."""
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "+", "~", "hydra")):
            continue
        key, value = arg.split("=", 1)
        if key in GROUPS:
            valid = group_choices(key, conf_dir)
            for choice in value.split(","):  # multirun sweeps list several
                if choice not in valid:
                    raise ConfigError(f"{key}={choice!r} is not a known choice; valid: {', '.join(valid)}")


def _require(cond: bool, key: str, value: Any, valid: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid; valid: {valid}")


def _positive_int(cfg, key: str, allow_zero: bool = False) -> None:
    value = cfg
    for part in key.split("."):
        value = value[part]
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    _require(ok, key, value, "an integer >= 0" if allow_zero else "an integer >= 1")


def validate(cfg: Any) -> None:
    lora, trainer, ev, seq = cfg.lora, cfg.trainer, cfg.evaluation, cfg.sequence
    _positive_int(cfg, "lora.r")
    _require(isinstance(lora.alpha, (int, float)) and lora.alpha > 0, "lora.alpha", lora.alpha, "a number > 0")
    _require(lora.scaling in ("rslora", "standard"), "lora.scaling", lora.scaling, "rslora, standard")
    _require(0.0 <= float(lora.dropout) < 1.0, "lora.dropout", lora.dropout, "a number in [0, 1)")
    _require(len(lora.target_modules) > 0, "lora.target_modules", list(lora.target_modules), "a non-empty list")
    _require(isinstance(trainer.lr, (int, float)) and 0 < trainer.lr < 1, "trainer.lr", trainer.lr, "a number in (0, 1)")
    _require(trainer.weight_decay >= 0, "trainer.weight_decay", trainer.weight_decay, "a number >= 0")
    _require(0 <= trainer.warmup_ratio < 1, "trainer.warmup_ratio", trainer.warmup_ratio, "a number in [0, 1)")
    _require(trainer.max_grad_norm > 0, "trainer.max_grad_norm", trainer.max_grad_norm, "a number > 0")
    for key in ("trainer.epochs", "trainer.batch_size", "trainer.grad_accum", "trainer.max_len",
                "evaluation.batch_size", "evaluation.max_new_tokens", "evaluation.max_prompt_len", "sequence.n_eval"):
        _positive_int(cfg, key)
    _positive_int(cfg, "trainer.checkpoint_every_steps", allow_zero=True)
    if trainer.get("max_steps") is not None:
        _positive_int(cfg, "trainer.max_steps")
    if cfg.get("threads") is not None:
        _positive_int(cfg, "threads")
    if seq.get("n_train") is not None:
        _positive_int(cfg, "sequence.n_train")
    if ev.get("limit") is not None:
        _positive_int(cfg, "evaluation.limit")
    _require(len(seq.tasks) > 0, "sequence.tasks", list(seq.tasks), "a non-empty list of task names")
    _require(len(set(seq.tasks)) == len(seq.tasks), "sequence.tasks", list(seq.tasks), "distinct task names")
    dev = str(cfg.device)
    _require(dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"), "device", dev, "auto, cpu, cuda, cuda:N")
    root = cfg.data.get("root")
    if root is not None and not Path(str(root)).is_dir():
        raise ConfigError(f"data.root={root!r} is not a directory; point it at the folder holding the benchmark data")


def module_shapes(model_path: str, target_modules: list[str], trust_remote_code: bool = False) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) per target Linear, from the model config alone (meta device: no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in target_modules
    }


def validate_rank(shapes: dict[str, tuple[int, int]], rank: int, target_modules: list[str]) -> None:
    if not shapes:
        raise ConfigError(f"lora.target_modules={list(target_modules)} match no Linear layer of the model")
    name, (d_out, d_in) = min(shapes.items(), key=lambda kv: min(kv[1]))
    if rank > min(d_out, d_in):
        raise ConfigError(f"lora.r={rank} exceeds min(d_out, d_in)={min(d_out, d_in)} of module {name}; lower lora.r")

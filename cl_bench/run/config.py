"""Config checks that run before any model is loaded; each failure is a one-line ConfigError."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..infra.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# One line per config group for `cl_bench --help`; tests check it names exactly the folders of conf/.
GROUP_HELP = {
    "model": "the base model: the embedded tiny Llama, or any HF name / local path (model.name_or_path)",
    "initializer": "how each stage's LoRA adapter starts (PEFT default, LoRA-GA, SLICE, PiSSA, ...)",
    "sequence": "the task sequence: synthetic, SuperNI, TRACE or CL-benchmark orders (needs data.root)",
    "regularizer": "extra loss terms added during training",
    "merge": "how a trained adapter enters the model before the next stage",
    "trainer": "optimizer and schedule: lr, epochs, batch size, max_steps",
    "evaluation": "seen-task evaluation: batch size, generation length, example limit",
    "general_eval": "general capability GP (zero-shot) / IP (few-shot) through lm-eval",
    "logger": "experiment tracking: none or wandb",
    "distributed": "one process (none), or data parallel over the processes of torchrun / accelerate launch / SLURM: whole model per rank (ddp) or frozen base sharded (fsdp)",
    "experiment": "presets of a paper's settings (slice_paper, ps_lora_paper, debug) and sweep grids",
    "experiment/method": "one method row of a paper's table (vanilla, loram, lora_ga, slice_c050, ...)",
}

# Hydra flags whose next argument is a value, not an override.
_FLAGS_WITH_VALUE = {
    "-sc",
    "--shell-completion",
    "-cn",
    "--config-name",
    "-cp",
    "--config-path",
    "-cd",
    "--config-dir",
    "-c",
    "--cfg",
    "-p",
    "--package",
    "--info",
    "-i",
    "--experimental-rerun",
}


def config_groups(conf_dirs: list[Path] | None = None) -> list[str]:
    """Group names = the sub-folders of conf/ (and of any --config-dir) holding YAMLs, nested ones
    as "parent/child" (experiment/method); Hydra's own groups (conf/hydra/...) are not ours."""
    dirs = conf_dirs or [CONF_DIR]
    groups = set()
    for i, d in enumerate(dirs):
        for p in d.glob("*/") if d.is_dir() else ():
            if p.name == "hydra":
                continue
            # one level of nesting (experiment/method) in conf/ itself; an extra --config-dir
            # (the repo root, for multirun.yaml) contributes only its direct sub-folders
            for g in (p, *(p.glob("*/") if i == 0 else ())):
                if any(g.glob("*.yaml")):
                    groups.add(g.relative_to(d).as_posix())
    return sorted(groups)


GROUPS = tuple(config_groups())


def group_choices(group: str, conf_dir: Path | list[Path] = CONF_DIR) -> list[str]:
    dirs = conf_dir if isinstance(conf_dir, list) else [conf_dir]
    return sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})


def choice_description(path: Path) -> str:
    """The first comment line of a group YAML (each one starts with what it is)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def _key_paths(node: Any, prefix: str = "") -> set[str]:
    out = set()
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}{k}"
            out.add(path)
            out |= _key_paths(v, path + ".")
    return out


def known_keys(conf_dirs: list[Path]) -> tuple[set[str], set[str]]:
    """(top-level keys of config.yaml, every dotted key path a group's YAMLs or config.yaml define)."""
    import yaml

    main = yaml.safe_load((conf_dirs[0] / "config.yaml").read_text()) or {}
    top = {k for k in main if k not in ("defaults", "hydra")}
    paths = _key_paths({k: main[k] for k in top})
    for group in config_groups(conf_dirs):
        for d in conf_dirs:
            for f in (d / group).glob("*.yaml"):
                paths |= _key_paths({group: yaml.safe_load(f.read_text()) or {}})
    return top, paths


def _did_you_mean(word: str, candidates) -> str:
    import difflib

    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _conf_dirs(argv: list[str], conf_dir: Path) -> list[Path]:
    dirs = [conf_dir]
    for i, arg in enumerate(argv):
        if arg in ("-cd", "--config-dir") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
    return dirs


def check_group_overrides(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Every `key=value` override must name a known group and choice or a known key; Hydra's own
    error for a typo is many lines of internals. Additions (`+key=`) and hydra.* are left to Hydra."""
    if any(a in ("-sc", "--shell-completion") or a.startswith("--shell-completion=") for a in argv):
        return  # tab completion queries pass partial words
    dirs = _conf_dirs(argv, conf_dir)
    multirun = any(a in ("--multirun", "-m") for a in argv)
    groups = config_groups(dirs)
    top = paths = None
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg in _FLAGS_WITH_VALUE:
            skip_next = True
            continue
        if "=" not in arg or arg.startswith(("-", "+", "~", "hydra")):
            continue
        key, value = arg.split("=", 1)
        if not multirun and "," in value and not value.startswith(("[", "{", "'", '"')):
            raise ConfigError(f"{arg} lists several values; add --multirun to run one job per value")
        if key in groups:
            valid = group_choices(key, dirs)
            for choice in value.split(","):  # multirun sweeps list several
                if choice not in valid:
                    hint = _did_you_mean(choice, valid)
                    raise ConfigError(
                        f"{key}={choice!r} is not a known choice{hint}{' ' if hint else '; '}valid: {', '.join(valid)}"
                    )
            continue
        if top is None:
            top, paths = known_keys(dirs)
        head = key.split(".", 1)[0]
        if head not in groups and head not in top:
            kind = "group" if _did_you_mean(head, groups) else "key"
            hint = _did_you_mean(head, groups) or _did_you_mean(head, top)
            if not hint:
                hint = f"; groups: {', '.join(groups)}; keys: {', '.join(sorted(top))}"
            raise ConfigError(f"unknown {kind} {head!r}{hint}")
        if "." in key and key not in paths:
            raise ConfigError(
                f"unknown key {key!r}{_did_you_mean(key, paths) or '; add it with +' + key + '=... if it is new'}"
            )


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
    _require(
        isinstance(trainer.lr, (int, float)) and 0 < trainer.lr < 1, "trainer.lr", trainer.lr, "a number in (0, 1)"
    )
    _require(trainer.weight_decay >= 0, "trainer.weight_decay", trainer.weight_decay, "a number >= 0")
    _require(0 <= trainer.warmup_ratio < 1, "trainer.warmup_ratio", trainer.warmup_ratio, "a number in [0, 1)")
    _require(trainer.max_grad_norm > 0, "trainer.max_grad_norm", trainer.max_grad_norm, "a number > 0")
    for key in (
        "trainer.epochs",
        "trainer.batch_size",
        "trainer.grad_accum",
        "trainer.max_len",
        "evaluation.batch_size",
        "evaluation.max_new_tokens",
        "evaluation.max_prompt_len",
        "sequence.n_eval",
    ):
        _positive_int(cfg, key)
    _positive_int(cfg, "trainer.checkpoint_every_steps", allow_zero=True)
    if trainer.get("log_every_steps") is not None:
        _positive_int(cfg, "trainer.log_every_steps")
    for key in ("fused_adamw", "compile", "gradient_checkpointing"):
        if key in trainer:
            _require(isinstance(trainer[key], bool), f"trainer.{key}", trainer[key], "true, false")
    from ..train.trainer import layout_of

    layout_of(trainer)  # trainer.layout / max_tokens_per_forward / forward_overhead_tokens
    if trainer.get("max_steps") is not None:
        _positive_int(cfg, "trainer.max_steps")
    if cfg.get("threads") is not None:
        _positive_int(cfg, "threads")
    if seq.get("n_train") is not None:
        _positive_int(cfg, "sequence.n_train")
    if ev.get("reference_margin") is not None:
        _positive_int(cfg, "evaluation.reference_margin", allow_zero=True)
    if ev.get("limit") is not None:
        _positive_int(cfg, "evaluation.limit")
    if ev.get("max_batch_tokens") not in (None, "auto"):
        _positive_int(cfg, "evaluation.max_batch_tokens")
    if ev.get("decode_step_tokens") is not None:
        _positive_int(cfg, "evaluation.decode_step_tokens", allow_zero=True)
    row0 = cfg.get("cache", {}).get("row0", True)
    _require(isinstance(row0, bool), "cache.row0", row0, "true, false")
    _require(len(seq.tasks) > 0, "sequence.tasks", list(seq.tasks), "a non-empty list of task names")
    _require(len(set(seq.tasks)) == len(seq.tasks), "sequence.tasks", list(seq.tasks), "distinct task names")
    from ..data.prompts import prompt_format  # ConfigError on a bad evaluation.prompt
    from ..data.tasks.base import PROTOCOLS

    protocol = ev.get("protocol", "per_task")
    _require(protocol in PROTOCOLS, "evaluation.protocol", protocol, ", ".join(PROTOCOLS))
    prompt_format(ev)
    from .modes import check_mode

    check_mode(cfg.get("mode", "sequential"))
    dev = str(cfg.device)
    _require(dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"), "device", dev, "auto, cpu, cuda, cuda:N")
    root = cfg.data.get("root")
    if root is not None and not Path(str(root)).is_dir():
        raise ConfigError(f"data.root={root!r} is not a directory; point it at the folder holding the benchmark data")


def module_shapes(
    model_path: str, target_modules: list[str], trust_remote_code: bool = False
) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) per target Linear, from the model config alone (meta device: no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..lora.layers import target_linears

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {name: (m.out_features, m.in_features) for name, m in target_linears(model, target_modules).items()}

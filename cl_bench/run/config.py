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
            # multirun sweeps list several; [a,b] selects several configs of the group at once
            for choice in value.strip("[]").split(","):
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
        if head in PLUGIN_GROUPS_OF_CONF and "." in key:
            _check_choice_key(key, argv, dirs)


PLUGIN_GROUPS_OF_CONF = ("initializer", "regularizer", "merge")  # groups whose keys depend on the choice


def _check_choice_key(key: str, argv: list[str], dirs: list[Path]) -> None:
    """`initializer.c=0.5` needs an initializer that has `c`: Hydra's own error for it is several
    lines whose advice (+initializer.c=...) then fails to build the plug-in."""
    group, sub = key.split(".", 1)
    selected = [a.split("=", 1)[1] for a in argv if a.startswith(f"{group}=[")]
    if selected:  # [a,b] selects several configs at once (a Composite): the key is one of the parts'
        parts = [p for value in selected for p in value.strip("[]").split(",")]
        if any(sub.split(".")[0] in _yaml_keys(dirs, group, p) for p in parts):
            return
        raise ConfigError(f"{key} is not a key of any of {group}={selected[-1]}")
    for choice in _chosen(group, argv, dirs) or ():
        keys = _yaml_keys(dirs, group, choice)
        if sub.split(".")[0] not in keys:
            owners = [c for c in group_choices(group, dirs) if sub.split(".")[0] in _yaml_keys(dirs, group, c)]
            raise ConfigError(
                f"{key} is not a key of {group}={choice}"
                + (f" (it is one of {group}={', '.join(owners)})" if owners else "")
                + f"; valid keys of {group}={choice}: {', '.join(sorted(keys - {'_target_'})) or 'none'}"
            )


def _yaml_keys(dirs: list[Path], group: str, choice: str) -> set[str]:
    import yaml

    return {
        k
        for d in dirs
        if (d / group / f"{choice}.yaml").is_file()
        for k in yaml.safe_load((d / group / f"{choice}.yaml").read_text()) or {}
    }


def _chosen(group: str, argv: list[str], dirs: list[Path]) -> list[str] | None:
    """The choices of `group` this command line composes (several in a sweep): its own override,
    else what the presets given set (`override /group: X`), else config.yaml's default. None when
    that is not known here (another --config-name, a preset that sweeps it): Hydra decides."""
    import yaml

    if any(a in ("-cn", "--config-name") or a.startswith("--config-name=") for a in argv):
        return None
    given = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if "=" in a and not a.startswith(("-", "+", "~"))}
    if group in given:
        return given[group].split(",")
    for preset in ("experiment/method", "experiment"):
        if preset in given:
            found = [_preset_choice(group, preset, value, dirs) for value in given[preset].split(",")]
            if any(f is None for f in found):
                return None
            if any(f for f in found):
                return sorted({c for f in found for c in (f or [_default(group, dirs)])})
    main = yaml.safe_load((dirs[0] / "config.yaml").read_text()) or {}
    return [_default(group, dirs)] if main else None


def _default(group: str, dirs: list[Path]) -> str:
    import yaml

    main = yaml.safe_load((dirs[0] / "config.yaml").read_text()) or {}
    return next(str(d[group]) for d in main.get("defaults", []) if isinstance(d, dict) and group in d)


def _preset_choice(group: str, preset: str, value: str, dirs: list[Path], depth: int = 0) -> list[str] | None:
    """[X] when preset `value` (or a preset it extends) sets `override /group: X`; [] when it does
    not; None when it sweeps the group (hydra.sweeper.params) or cannot be read."""
    import yaml

    path = next((d / preset / f"{value}.yaml" for d in dirs if (d / preset / f"{value}.yaml").is_file()), None)
    if path is None or depth > 8:
        return None
    node = yaml.safe_load(path.read_text()) or {}
    params = ((node.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    if group in params or "experiment/method" in params:
        return None
    for entry in node.get("defaults") or []:
        if isinstance(entry, dict) and f"override /{group}" in entry:
            return [str(entry[f"override /{group}"])]
        if isinstance(entry, str) and entry != "_self_":
            inner = _preset_choice(group, preset, entry, dirs, depth + 1)
            if inner != []:
                return inner
    return []


def _require(cond: bool, key: str, value: Any, valid: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid; valid: {valid}")


def validate(cfg: Any) -> None:
    """Every key's type and range from the one schema (infra/config_keys.py), then what depends on
    several keys; each failure a one-line ConfigError, before anything is loaded."""
    from omegaconf import OmegaConf

    from ..infra.config_keys import check_values

    check_values(OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg)
    seq, ev = cfg.sequence, cfg.evaluation
    _require(len(set(seq.tasks)) == len(seq.tasks), "sequence.tasks", list(seq.tasks), "distinct task names")
    from ..train.trainer import layout_of

    layout_of(cfg.trainer)  # trainer.layout / max_tokens_per_forward / forward_overhead_tokens
    from ..data.prompts import prompt_format  # ConfigError on a bad evaluation.prompt

    prompt_format(ev)
    root = cfg.data.get("root")
    if root is not None and not Path(str(root)).is_dir():
        raise ConfigError(f"data.root={root!r} is not a directory; point it at the folder holding the benchmark data")


def check_plugin_pairs(plugins: dict[str, Any]) -> None:
    """ConfigError for plug-ins that cannot run together (stage.Plugin's flags): an initializer whose
    PEFT preprocessing needs plain Linear targets beside a merge that keeps earlier adapters in the
    model would finish stage 1 and die in stage 2 with PEFT's error."""
    init, merge = plugins["initializer"], plugins["merge"]
    if init.plain_targets and merge.keeps_adapters:
        raise ConfigError(
            f"initializer={init.name} cannot be used with merge={merge.name}: PEFT's {init.name} needs a model with no "
            f"other adapter (plain Linear targets, one active adapter) and {merge.name} keeps every earlier stage's "
            "adapter in it (stage 2 would fail); valid with it: initializer=vanilla, lora_ga, slice, loram, milora, pissa, olora"
        )


def check_prompt_budget(truncation: dict[str, dict], ev: Any, max_positions: int) -> None:
    """ConfigError when the evaluation prompt budget (the model's positions minus
    evaluation.max_new_tokens, capped by evaluation.max_prompt_len) cannot hold some task's chat
    template and instruction (`longest_head` of data.prompts.prompt_truncation): its prompts would be
    cut into the instruction (or be 2 tokens long) and the run would score garbage as `complete`."""
    for task, stats in truncation.items():
        budget, head = stats["eval"]["budget"], stats["eval"]["longest_head"]
        if budget > head:
            continue
        new, cap = int(ev.max_new_tokens), int(ev.max_prompt_len)
        if cap <= max_positions - new:
            key, valid = f"evaluation.max_prompt_len={cap}", f"evaluation.max_prompt_len >= {head + 1}"
        else:
            key, valid = f"evaluation.max_new_tokens={new}", f"evaluation.max_new_tokens <= {max_positions - head - 1}"
        raise ConfigError(
            f"{key} leaves evaluated prompts {budget} tokens (model positions {max_positions}, "
            f"evaluation.max_new_tokens={new}, evaluation.max_prompt_len={cap}), but task {task!r} needs "
            f"{head} for its chat template and instruction alone; valid: {valid}"
        )


def module_shapes(
    model_path: str, target_modules: list[str], trust_remote_code: bool = False
) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) per target Linear, from the model config alone (meta device: no weights).
    ConfigError for a target tied to the input embeddings (lora.layers.refuse_tied_targets)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..lora.layers import refuse_tied_targets, target_linears

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    refuse_tied_targets(model, target_modules)
    return {name: (m.out_features, m.in_features) for name, m in target_linears(model, target_modules).items()}

"""The generated bad-input table: every key of conf/config.yaml and of every choice of every config
group, a value its schema (cl_bench/infra/config_keys.py) refuses, and the one line the config check
gives for it. `python tests/helpers/bad_values.py` prints it as Markdown; tests/run/test_config_schema.py
checks every row.

Values are typed as on the command line (`key=abc`, parsed by Hydra's override grammar), into the
config composed with the key's group choice, then checked by run/config.validate, which the runner
calls before anything loads (the CLI prints its ConfigError as `cl_bench: error: <line>`, exit 2).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `helpers` and `cl_bench` importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

from helpers import REPO, compose

# Presets and Hydra's own launcher settings set other groups' keys; they have none of their own.
NOT_KEY_GROUPS = ("experiment", "experiment/method")


def conf_keys() -> list[tuple[list[str], str]]:
    """[(overrides that select the key's group choice, dotted key)] for every key of config.yaml and
    of every choice of every group, each key (per plug-in `_target_`) once, in conf/ order."""
    import yaml

    from cl_bench.infra.config_keys import PLUGIN_GROUPS, flatten, spec_of
    from cl_bench.run.config import CONF_DIR, config_groups, group_choices

    def leaf(key: str, value: Any) -> bool:  # a folder of keys (lora, evaluation.prompt) is not a key
        return not isinstance(value, dict) or getattr(spec_of(key), "kind", None) == "map"

    out, seen = [], set()
    main = yaml.safe_load((CONF_DIR / "config.yaml").read_text())
    for key, value in flatten({k: v for k, v in main.items() if k not in ("defaults", "hydra")}).items():
        if leaf(key, value):
            out.append(([], key))
    for group in config_groups():
        if group in NOT_KEY_GROUPS:
            continue
        for choice in group_choices(group):
            node = yaml.safe_load((CONF_DIR / group / f"{choice}.yaml").read_text()) or {}
            for key, value in flatten({group: node}).items():
                ident = (node.get("_target_"), key) if group in PLUGIN_GROUPS else key
                internal = key.endswith("._target_") or "._parts_" in key  # the plug-in's class, a composite's parts
                if key == group or internal or ident in seen or not leaf(key, value):
                    continue
                seen.add(ident)
                out.append(([f"{group}={choice}"], key))
    return out


def bad_value(spec) -> str:
    """A command-line value the key's schema refuses: the wrong type, else out of range."""
    return {
        "int": "abc",
        "number": "abc",
        "bool": "abc",
        "text": "12",
        "choice": "nope",
        "texts": "abc",
        "map": "abc",
        "fraction_or_count": "abc",
        "auto_or_int": "abc",
        "device": "tpu",
    }[spec.kind]


def parse(key: str, text: str) -> Any:
    """The value Hydra gives `key=text` on the command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"{key}={text}").value()


def table() -> list[tuple[str, str, str]]:
    """[(key, value tried, the error line)] for every key of conf_keys()."""
    from omegaconf import OmegaConf

    from cl_bench.infra.config_keys import spec_of
    from cl_bench.infra.errors import ConfigError
    from cl_bench.run.config import validate

    rows, composed = [], {}
    for overrides, key in conf_keys():
        base = composed.setdefault(tuple(overrides), compose(overrides))
        spec = spec_of(key, OmegaConf.to_container(base, resolve=True))
        if spec is None:
            rows.append((key, "-", "NOT IN THE SCHEMA"))
            continue
        text = bad_value(spec)
        cfg = base.copy()
        OmegaConf.update(cfg, key, parse(key, text), force_add=True)
        try:
            validate(cfg)
            line = "ACCEPTED"
        except ConfigError as err:
            line = str(err)
        rows.append((" ".join([*overrides, f"{key}={text}"]), text, line))
    return rows


def markdown(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| command line | value tried | the line it gets (`cl_bench: error: ...`) |", "|---|---|---|"]
    lines += [f"| `{k}` | `{v}` | {line.replace('|', '/')} |" for k, v, line in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    import os

    os.chdir(REPO)
    print(markdown(table()))

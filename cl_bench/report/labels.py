"""How runs are named in the report: the method (initializer + non-default plug-ins, or the run
mode), a block's label (sequence + the non-method keys that vary), a row's label (method + its
knobs that vary), short knob names, and the natural sort order of labels.
"""

from __future__ import annotations

import re
from typing import Any

# The method's plug-ins: their knobs label rows (not blocks), and differ between methods by design.
METHOD_GROUPS = ("initializer", "regularizer", "merge")
# Plug-in classes that are the plain sequential-LoRA defaults (conf/config.yaml): not named in a
# method label. Any other regularizer or merge is ("Vanilla+Replay").
DEFAULT_PLUGINS = {"regularizer": "Regularizer", "merge": "Absorb"}
# The run mode (cl_bench/run/modes.py) is part of the method: a multitask or independent run is a row
# beside the methods ("Multitask", "Independent"), not a block of its own.
MODE_KEY = "mode"
MODE_LABELS = {"multitask": "Multitask", "independent": "Independent"}


def is_method_key(key: str) -> bool:
    """Whether a flattened config key belongs to the method (its plug-ins' groups, or the run mode)."""
    return key.split(".")[0] in METHOD_GROUPS or key == MODE_KEY


def _class(config: dict, group: str) -> str | None:
    target = (config.get(group) or {}).get("_target_")
    return None if target is None else str(target).rsplit(".", 1)[-1]


def _classes(config: dict, group: str) -> list[str]:
    """The group's plug-in class, or the classes of a composite's parts in order (regularizer=[a,b])."""
    cls = _class(config, group)
    parts = (config.get(group) or {}).get("parts")
    if cls == "Composite" and isinstance(parts, dict):
        return [str(p.get("_target_", "?")).rsplit(".", 1)[-1] for p in parts.values() if isinstance(p, dict)]
    return [] if cls is None else [cls]


def method_of(config: dict) -> str:
    """The method's name: the initializer class, + the regularizer and merge when not the
    defaults (e.g. "Vanilla", "Slice", "Vanilla+Replay", "LoraGA+TiesMerge"; several regularizers
    in one run: "Vanilla+PSLoss+OLoRA"); a reference mode replaces a Vanilla initializer
    ("Multitask", "Independent", "Multitask+LoraGA")."""
    init = _class(config, "initializer") or "?"
    mode = MODE_LABELS.get(str(config.get(MODE_KEY, "sequential")))
    parts = [init] if mode is None else [mode] if init == "Vanilla" else [mode, init]
    for group, default in DEFAULT_PLUGINS.items():
        parts += [cls for cls in _classes(config, group) if cls != default]
    return "+".join(parts)


def block_label(sequence: Any, knobs: dict[str, str], without: str | None = None) -> str:
    """ "<sequence>, k=v, ..." of the non-method knobs (`without`: a key left out, e.g. a curve's x)."""
    parts = [str(sequence)] + [f"{k}={v}" for k, v in knobs.items() if not is_method_key(k) and k != without]
    return ", ".join(parts)


def method_label(method: Any, knobs: dict[str, str], short: dict[str, str], without: str | None = None) -> str:
    """ "<method> k=v ..." of the method knobs, named by `short` (`without`: a key left out)."""
    parts = [str(method)] + [f"{short.get(k, k)}={v}" for k, v in knobs.items() if is_method_key(k) and k != without]
    return " ".join(parts)


def short_names(keys: list[str]) -> dict[str, str]:
    """initializer.c -> c, unless two shown keys end alike."""
    tails = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (t if tails.count(t) == 1 else k) for k, t in zip(keys, tails)}


def natural_key(s: Any) -> Any:
    """Sort key: numbers inside labels compare as numbers (alpha=4 before alpha=16)."""
    return tuple(
        (0, float(t), "") if re.fullmatch(r"-?\d+(\.\d+)?", t) else (1, 0.0, t)
        for t in re.split(r"(-?\d+(?:\.\d+)?)", str(s))
    )

"""Several regularizers in one run: `regularizer=[ps_loss,o_lora]` (Hydra's selection of several
configs from one group), e.g. PS-LoRA's loss added to O-LoRA (PS-LoRA Table 7), EWC + replay,
GPM + replay.

How the command line becomes a Composite. Hydra merges the selected YAMLs into ONE `regularizer`
node, so the last `_target_` wins and the parts' keys sit side by side. Each regularizer YAML
therefore also names itself in `_parts_` ({name: class}), a mapping that the merge accumulates in
selection order. `normalize_config` (run by the runner before it records the config, and by
runner.build_plugins) rewrites the node:
  * one part: `_parts_` is dropped (the node is what it always was);
  * several: {_target_: Composite, parts: {name: {_target_: class, its keys}}}, each key given to
    the part whose constructor takes it. Overrides such as `regularizer.lambda_1=5.0` are merged
    before, so they reach their part. A key two parts take (ewc's and ps_loss's `lam`) would be one
    merged value for both: refused in one line, as is a key no part takes.
results.json records the rewritten node; the report labels the run by its parts' classes
(`Vanilla+PSLoss+OLoRA`).

The Composite calls each part's hooks in the selected order, with one exception: a part that may
re-set the stage's starting A (InfLoRA, GPM with project_init, O-LoRA under an absorbed init) runs
its begin_stage first, so the others (StageDelta of PS-loss and EWC, GPM's pinned A·M) start from
the A that training starts from; two such parts cannot compose (each would undo the other's
start) and are refused. Loss terms are the union of the parts' named terms (each logged under its
own name: ps_loss, orth, l2, ewc); extra examples (replay) are concatenated; gradient and step
edits (GPM's projection) apply after every part's loss term, to the whole gradient. State: every
part's state_dict under the prefix "<name>/", in the one regularizer.safetensors of the stage and
of every in-stage checkpoint, so a resume after kill -9 restores each part.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from ..data.tasks.base import TaskData
from ..infra.errors import ConfigError
from ..stage import Plugin, Regularizer, StageContext

MARKER = "_parts_"  # each regularizer YAML: {its name: its class}; accumulates under a list selection
TARGET = f"{__name__}.Composite"


def _keys_taken(target: str) -> set[str]:
    from hydra.utils import get_class

    try:
        cls = get_class(target)
    except Exception as exc:  # a wrong class path in a YAML
        raise ConfigError(f"regularizer: cannot import {target!r} ({exc})") from None
    return {p for p in inspect.signature(cls.__init__).parameters if p != "self"}


def split_parts(node: Mapping[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The parts of a merged regularizer node, {name: {_target_, keys}} in selection order, or None
    for a single regularizer. Raises ConfigError for a key two parts take or that no part takes."""
    parts = dict(node.get(MARKER) or {})
    if len(parts) < 2:
        return None
    taken = {name: _keys_taken(str(target)) for name, target in parts.items()}
    keys = [k for k in node if k not in ("_target_", MARKER)]
    selection = f"regularizer=[{','.join(parts)}]"
    for key in keys:
        owners = [name for name, params in taken.items() if key in params]
        if len(owners) > 1:
            raise ConfigError(
                f"{selection}: {' and '.join(owners)} both take {key!r}, which a list selection merges into one "
                "value for both; they cannot be composed from the config groups"
            )
        if not owners:
            raise ConfigError(
                f"{selection}: no part takes regularizer.{key}; valid keys: {', '.join(sorted(set().union(*taken.values())))}"
            )
    return {
        name: {"_target_": str(target), **{k: node[k] for k in keys if k in taken[name]}}
        for name, target in parts.items()
    }


def normalize_config(cfg) -> None:
    """Rewrite cfg.regularizer in place as the module docstring says (idempotent)."""
    from omegaconf import OmegaConf, open_dict

    node = cfg.get("regularizer")
    if node is None or MARKER not in node:
        return
    container = OmegaConf.to_container(node, resolve=False)
    parts = split_parts(container)
    with open_dict(cfg):
        if parts is None:
            del cfg.regularizer[MARKER]
        else:
            cfg.regularizer = OmegaConf.create({"_target_": TARGET, "parts": parts})


class Composite(Regularizer):
    """Several regularizers as one (see the module docstring); `parts`: name -> built plug-in."""

    def __init__(self, parts: Mapping[str, Regularizer]):
        self.parts = dict(parts)
        if len(self.parts) < 2:
            raise ConfigError(f"regularizer: a composite needs two or more parts, got {list(self.parts)}")
        self.name = "+".join(p.name for p in self.parts.values())
        setters = [n for n, p in self.parts.items() if p.sets_start_A]
        if len(setters) > 1:
            raise ConfigError(
                f"regularizer=[{','.join(self.parts)}]: {' and '.join(setters)} both re-set the stage's starting A "
                "(each would undo the other's start); compose at most one of them"
            )
        self.order = setters + [n for n in self.parts if n not in setters]  # begin_stage order

    @property
    def sharded_weights(self) -> bool:
        return all(p.sharded_weights for p in self.parts.values())

    @property
    def sets_start_A(self) -> bool:
        return any(p.sets_start_A for p in self.parts.values())

    def adds_loss_terms(self) -> bool:
        return any(p.adds_loss_terms() for p in self.parts.values())

    def configure(self, plugins: Mapping[str, Plugin]) -> None:
        for part in self.parts.values():
            part.configure(plugins)

    def begin_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        for name in self.order:
            self.parts[name].begin_stage(model, ctx)

    def loss(self, model, batch, ctx: StageContext) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for name, part in self.parts.items():
            for term, value in part.loss(model, batch, ctx).items():
                if term in terms:
                    raise RuntimeError(f"regularizer {name!r} logs term {term!r}, which another part logs too")
                terms[term] = value
        return terms

    def extra_examples(self, ctx: StageContext, step: int, micro: int) -> list[tuple[TaskData, int]]:
        return [item for part in self.parts.values() for item in part.extra_examples(ctx, step, micro)]

    def after_backward(self, model: torch.nn.Module, ctx: StageContext) -> None:
        for part in self.parts.values():
            part.after_backward(model, ctx)

    def after_step(self, model: torch.nn.Module, ctx: StageContext) -> None:
        for part in self.parts.values():
            part.after_step(model, ctx)

    def end_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        for part in self.parts.values():
            part.end_stage(model, ctx)

    def state_dict(self) -> dict[str, Any]:
        return {f"{name}/{k}": v for name, part in self.parts.items() for k, v in part.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, part in self.parts.items():
            prefix = f"{name}/"
            part.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

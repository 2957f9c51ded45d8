"""The merge seam: after stage t's training, decide the model stage t+1 trains on and the model
that is evaluated (they may differ, and either may stay PEFT-wrapped).

A merge is a thin plug-in over pure tensor functions (cl_bench/lora/task_vectors.py). At `consolidate`,
ctx.history already holds stage t, so the task vectors τ_1..τ_t are
`ctx.history.task_vectors(module)` (exactly recomputed from the stage files, also after resume).
Weights change only through the one fold, `ctx.master.fold_(name, layer, Δ)` (lora/layers.py), which
keeps float32 masters of low-precision weights. Everything the merge needs beyond the history
to rebuild its models on resume goes into `state_dict()`; `restore` rebuilds them.

`TaskVectorMerge` is the shared shape of the merges whose evaluated model is W0 + X(τ_1..τ_t)
for a pure function X (task arithmetic, average, TIES, DARE, MagMax): a subclass only names X.
X of one task vector is the identity (`TaskVectorMerge.merged`): the merge applies from t = 2.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..infra.errors import ConfigError
from ..lora import task_vectors as merges
from ..lora.layers import fold_adapter_, lora_layers, target_linears
from ..stage import Models, Plugin, StageContext, StageRecord


class Merge(Plugin):
    name = "merge"

    def consolidate(self, model: torch.nn.Module, ctx: StageContext) -> Models:
        """Called once per stage with the trained PEFT model (adapter ctx.adapter), after
        end_stage and after stage t joined ctx.history. Returns the train and eval models."""
        raise NotImplementedError

    def restore(self, model: torch.nn.Module, ctx: StageContext) -> Models:
        """On resume after stage ctx.stage: `model` is a fresh model whose target weights hold
        the saved train model's (model_state), ctx.history holds stages 1..ctx.stage, and this
        plug-in's state is loaded. Default: that model both trains and is evaluated."""
        return Models(train=model, eval=model)

    def eval_delta(
        self, history: Sequence[StageRecord], module: str, device: torch.device | str | None = None
    ) -> torch.Tensor | None:
        """E such that the model evaluated after the stages in `history` is W0 + E at `module`
        ([d_out, d_in] float32 on `device`), or None when the evaluated model is not W0 plus a
        function of the task vectors (a merge that keeps branches). `python -m cl_bench.remerge`
        recomputes eval models with it and compares two merges' E to find the rows that change."""
        return None

    def train_delta(
        self, history: Sequence[StageRecord], module: str, device: torch.device | str | None = None
    ) -> torch.Tensor | None:
        """The same for the model the next stage trains on (None when not such a function)."""
        return None


TRAIN_ON = ("sum", "merged")


def _number(key: str, value: Any, ok, valid: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
        raise ConfigError(f"merge.{key}={value!r} is invalid; valid: {valid}")
    return float(value)


def _choice(key: str, value: Any, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ConfigError(f"merge.{key}={value!r} is invalid; valid: {', '.join(valid)}")
    return str(value)


class TaskVectorMerge(Merge):
    """A merge whose evaluated model after stage t is W0 + X(τ_1..τ_t) (X: `merge`).

    `train_on` decides the model stage t+1 trains on:
      "sum"    — W0 + Σ_{i≤t} τ_i, the model sequential training reached (absorb's model, PS-LoRA
                 Algorithm 1's forward pass W0·x + Σ_{i<t} ΔW_i·x + ΔW_t·x with the earlier
                 deltas' sum folded into W: the same function at one matmul per layer). X is
                 applied for evaluation only ("post-training merging", PS-LoRA Table 19), so
                 the training trajectory is absorb's, bit for bit, and a remerge of any
                 absorb-trained run reproduces this merge's rows. Costs one extra copy of the
                 target weights (in their dtype) for the eval model, held from consolidate to
                 the next consolidate.
      "merged" — W0 + X(τ_1..τ_t), the eval model itself; τ_{t+1} is then measured against it,
                 so X changes every later stage's training.
    Everything needed beyond the train weights is the history (the per-stage factor files the
    runner already writes): the eval model is rebuilt from it in `restore`. state_dict holds
    the stage count and Σ‖X‖²_F over modules, checked on restore so a history or config that no
    longer reproduces the merge stops the resume instead of silently evaluating another model.
    """

    name = "task_vector_merge"

    def __init__(self, train_on: str = "sum") -> None:
        self.train_on = _choice("train_on", train_on, TRAIN_ON)
        self.stages = 0
        self.merged_sq_norm: float | None = None

    @property
    def sharded_weights(self) -> bool:  # "sum" evaluates a second model: a copy of a sharded one is not built
        return self.train_on == "merged"

    # ---- the math (subclasses) ---------------------------------------------------------
    def merge(self, taus: list[torch.Tensor], stages: list[int], module: str) -> torch.Tensor:
        """X(τ_1..τ_t) of one module for t ≥ 2; `stages` are the τ's stage numbers (seeds of random merges)."""
        raise NotImplementedError

    def merged(self, taus: list[torch.Tensor], stages: list[int], module: str) -> torch.Tensor:
        """X(τ_1..τ_t), with X(τ_1) = τ_1: a merge of one task vector is the identity. There is nothing
        to merge after stage 1 (merging resolves interference between task vectors), so the model
        after stage 1 is W0 + τ_1 under every merge, and R[1, ·] (hence R[1, 1] in AP) is measured on
        the trained model, not on a TIES-trimmed, DARE-dropped or λ-scaled τ_1; X applies from t = 2."""
        if len(taus) == 1:
            return taus[0].clone()
        return self.merge(taus, stages, module)

    # ---- deltas of the two models --------------------------------------------------------
    @staticmethod
    def _taus(history: Sequence[StageRecord], module: str, device) -> list[torch.Tensor]:
        return [r.task_vector(module).to(device) for r in history]

    def eval_delta(self, history, module, device=None) -> torch.Tensor:
        return self.merged(self._taus(history, module, device), [r.stage for r in history], module)

    def train_delta(self, history, module, device=None) -> torch.Tensor:
        if self.train_on == "merged":
            return self.eval_delta(history, module, device)
        return merges.task_sum(self._taus(history, module, device))

    # ---- the plug-in ---------------------------------------------------------------------
    @torch.no_grad()
    def consolidate(self, model: torch.nn.Module, ctx: StageContext) -> Models:
        history = list(ctx.history)
        if self.train_on == "sum":
            fold_adapter_(model, ctx.adapter, ctx.master)  # W_{t-1} − s·B0·A0 + s·B·A = W0 + Σ τ
            train = model.unload()
            models, norm = self._eval_model(train, ctx)
        else:
            record, norm = history[-1], 0.0
            # The weights hold W0 + X(τ_<t) − s·B0·A0 (absorbed init) with the adapter on top;
            # the adapter is dropped (unload) and W moves to W0 + X(τ_≤t).
            for name, layer in lora_layers(model, ctx.adapter).items():
                device = layer.get_base_layer().weight.device
                merged = self.eval_delta(history, name, device)
                norm += float(merged.double().pow(2).sum())
                delta = merged - self.eval_delta(history[:-1], name, device) if len(history) > 1 else merged
                if record.init is not None and name in record.init:
                    A0, B0 = record.init[name]
                    delta = delta + merges.lora_delta(A0.to(device), B0.to(device), record.scaling[name])
                ctx.master.fold_(name, layer, delta)
            train = model.unload()
            models = Models(train=train, eval=train)
        self.stages, self.merged_sq_norm = len(history), norm
        return models

    @torch.no_grad()
    def restore(self, model: torch.nn.Module, ctx: StageContext) -> Models:
        history = list(ctx.history)
        if self.stages != len(history):
            raise ConfigError(
                f"merge state holds {self.stages} merged stages but the run dir has {len(history)}; use another hydra.run.dir"
            )
        if self.train_on == "sum":
            models, norm = self._eval_model(model, ctx)
        else:
            models, norm = Models(train=model, eval=model), 0.0
            for name, linear in target_linears(model, ctx.target_modules).items():
                norm += float(self.eval_delta(history, name, linear.weight.device).double().pow(2).sum())
        if self.merged_sq_norm is not None and abs(norm - self.merged_sq_norm) > 1e-6 * max(1.0, self.merged_sq_norm):
            raise ConfigError(
                f"merge {self.name}: the merge recomputed from the stage files (Σ‖ΔW‖² = {norm:.9g}) differs from "
                f"the saved one ({self.merged_sq_norm:.9g}); the stage files changed — use another hydra.run.dir"
            )
        return models

    def _eval_model(self, train: torch.nn.Module, ctx: StageContext) -> tuple[Models, float]:
        """train_on="sum": a copy of `train` (sharing every tensor but the target weights) with
        W_eval = W_train + X(τ_≤t) − Σ τ_≤t = W0 + X(τ_≤t), computed in float32 from the train
        weights' exact value (their fp32 master) and cast once."""
        history = list(ctx.history)
        linears = target_linears(train, ctx.target_modules)
        own = {id(linear.weight) for linear in linears.values()}
        shared = {id(t): t for t in itertools.chain(train.parameters(), train.buffers()) if id(t) not in own}
        eval_model = copy.deepcopy(train, shared)
        eval_linears = target_linears(eval_model, ctx.target_modules)
        norm = 0.0
        for name in history[-1].modules:
            weight = linears[name].weight
            taus = self._taus(history, name, weight.device)
            merged = self.merged(taus, [r.stage for r in history], name)
            norm += float(merged.double().pow(2).sum())
            exact = ctx.master.value(name, weight).float()
            eval_linears[name].weight.copy_(exact + (merged - merges.task_sum(taus)))
        return Models(train=train, eval=eval_model), norm

    def state_dict(self) -> dict[str, Any]:
        return {"stages": self.stages, "train_on": self.train_on, "merged_sq_norm": self.merged_sq_norm}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("train_on", self.train_on) != self.train_on:
            raise ConfigError(f"merge.train_on={self.train_on!r} but the run dir was merged with {state['train_on']!r}")
        self.stages, self.merged_sq_norm = int(state["stages"]), state.get("merged_sq_norm")

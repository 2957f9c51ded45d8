"""InfLoRA — Interference-Free Low-Rank Adaptation (Liang & Li, CVPR 2024), LoRA-factor form.

Memory (representations.InputMemory, shared with gpm): per target module an orthonormal basis
M [d_in, k] of earlier tasks' inputs (real tokens, padding excluded; GPM's energy criterion,
Eqs. 16, 20–22 of the survey), grown at every stage end and saved in state_dict, so resume keeps it.

Each stage, before the first step (begin_stage), the input-side factor A (PEFT's lora_A,
[r, d_in]) is set inside span M⟂ and frozen; only B trains. Then ΔW = s·B·A satisfies ΔW·x = 0
for every x ∈ span M whatever B becomes and whatever the optimizer (AdamW included): the new
task does not interfere with the old tasks' inputs, exactly, up to the energy 1 − ε_t that M leaves out.

design (how A is set):
  project (default; InfLoRA's LLM code in the GainLoRA repo): the initializer's A with its rows
    projected off M and rescaled to their norms before projection (A − A·M·Mᵀ; a Kaiming-uniform
    row has norm ≈ 1/√3, the value that code rescales to). With vanilla init this is that code's
    InfLoRA; with a data-driven init (SLICE, LoRA-GA, ...) the initializer's input directions are
    kept as far as they are free of the memory.
  inputs (the CVPR paper's design): A = the r leading principal directions of the current task's
    inputs projected off M (Ĥ_t = H_t − M·Mᵀ·H_t), collected through the model as the stage
    starts; the initializer's A is replaced.
Composition with initializers (InfLoRA owns A): `project` takes the initializer's A and
projects it, which is faithful (A ⟂ M, frozen) and keeps what the initializer chose as far as the
memory allows; `inputs` replaces it outright. Either way, if the init was absorbed (SLICE,
LoRA-GA, PiSSA, ...: W = W_prev − s·B0·A0) the absorbed part is re-folded, W ← W + s·B0·(A0 − A)
(lora.replace_start_A_), so the model's function at t = 0 is unchanged (up to float rounding)
and the stage history records (A, B0) as the absorbed init; B starts at B0. Worth knowing: with A
frozen the stage's model is W_prev + s·(B − B0)·A, and AdamW without weight decay does not
depend on where B starts, so B0 has no effect: an absorbing initializer acts on InfLoRA only
through its A under `project`, and not at all under `inputs` (measured: equal losses to 5 digits).

Deviation: the LLM reference code applies its threshold to the squares of the singular values of
the per-module matrix it accumulates; if that matrix is the input covariance (as in InfLoRA's own
code) that ranks directions by σ⁴ instead of GPM's energy σ². We use GPM's energy criterion
(Eqs. 16, 20–22), so the same ε keeps more directions than that code would.
Cost per stage: the memory update (one no-grad pass over n_samples examples and one
eigendecomposition per module); `inputs` adds one such pass over the current task at the start.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..infra.errors import ConfigError
from ..lora import linalg
from ..lora.layers import lora_layers, replace_start_A_
from ..lora.representations import InputMemory, collect_input_grams
from ..stage import Regularizer, StageContext

DESIGNS = ("project", "inputs")


class InfLoRA(Regularizer):
    name = "inflora"

    def __init__(
        self,
        threshold: float = 0.97,
        threshold_increment: float = 0.002,
        design: str = "project",
        n_samples: int = 128,
        batch_size: int = 16,
    ):
        if design not in DESIGNS:
            raise ConfigError(f"regularizer (inflora): design={design!r}; valid: {', '.join(DESIGNS)}")
        self.memory = InputMemory(threshold, threshold_increment, n_samples, batch_size, where="regularizer (inflora)")
        self.design = design

    def begin_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        layers = lora_layers(model, ctx.adapter)
        if self.design == "inputs":
            n = min(self.memory.n_samples, len(ctx.current.train))
            bs = min(self.memory.batch_size, n)
            grams = collect_input_grams(model, layers, ctx.make_batches(ctx.current, -(-n // bs), bs, ctx.seed)).grams
            new_A = {
                name: linalg.principal_rows(grams[name], self.memory.basis(name), layer.r[ctx.adapter])
                for name, layer in layers.items()
            }
        else:
            new_A = {
                name: linalg.project_rows(layer.lora_A[ctx.adapter].weight, self.memory.basis(name))
                for name, layer in layers.items()
                if self.memory.basis(name) is not None
            }
        done = replace_start_A_(model, ctx.adapter, new_A, ctx.master, ctx.init_absorbed)
        ctx.log(
            f"stage {ctx.stage}: inflora set A in {done['modules']} of {len(layers)} modules (design={self.design}; "
            f"re-folded ‖s·B0·(A0 − A)‖_F = {done['refolded_fro']:.3g}); A frozen, B trains"
        )
        for layer in layers.values():
            layer.lora_A[ctx.adapter].weight.requires_grad_(False)  # InfLoRA trains B only

    def end_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        self.memory.update(model, lora_layers(model, ctx.adapter), ctx)

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.memory.load_state_dict(state)

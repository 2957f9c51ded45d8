"""InfLoRA — Interference-Free Low-Rank Adaptation (Liang & Li, CVPR 2024), LoRA-factor form.

Memory (representations.InputMemory, shared with gpm): per target module an orthonormal basis
M [d_in, k] of earlier tasks' inputs (real tokens, padding excluded), grown at every stage end and
saved in state_dict, so resume keeps it. Its rule (`criterion`, linalg.CRITERIA) and threshold
follow the authors' LLM code (liangyanshuo/gainlora: cl_trainer_inflora.py, the InfLoRA baseline,
and cl_trainer_gainlora_inflora.py, GainLoRA+InfLoRA; its scripts pass --threshold 0.995):
"covariance" — the SVD of the input covariance, directions ranked by its squared singular values
(σ⁴ of the inputs; the first task keeps sum(cumsum < ε) of them) — at ε_t = 0.995 + (1 − 0.995)·(t − 1)/15.
`criterion: energy` is GPM's paper rule (σ², Eqs. 16, 20–22), which keeps far more directions at
the same ε (on λ_i = 1/i, d = 256: 213 at ε = 0.97, the default here before; 82 under the authors' rule).

Each stage, before the first step (begin_stage), the input-side factor A (PEFT's lora_A,
[r, d_in]) is set inside span M⟂ and frozen; only B trains. Then ΔW = s·B·A satisfies ΔW·x = 0
for every x ∈ span M whatever B becomes and whatever the optimizer (AdamW included): the new
task does not interfere with the old tasks' inputs, exactly, up to the energy 1 − ε_t that M
leaves out. It holds for the stage's whole update τ_t = s·(B − B0)·A under an absorbed init too
(below: the absorbed part is re-folded onto the new A).

design (how A is set):
  project (the authors' InfLoRA baseline, cl_trainer_inflora.py): the initializer's A with its rows
    projected off M and rescaled to their norms before projection (A − A·M·Mᵀ; a Kaiming-uniform
    row has norm ≈ 1/√3, the value that code rescales to). With vanilla init this is that code's
    InfLoRA; with a data-driven init (SLICE, LoRA-GA, ...) the initializer's input directions are
    kept as far as they are free of the memory. Nothing is set at stage 1 (no memory yet), as there.
  inputs (the CVPR paper's design; the authors' GainLoRA+InfLoRA trainer, at every task, the
    first included): A = the r leading principal directions of the current task's inputs
    projected off M (Ĥ_t = H_t − M·Mᵀ·H_t), collected through the model as the stage starts, each
    row of norm 1/√3 (both authors' codes divide the unit singular vectors by √3; unit rows gave a
    1.6× larger ‖ΔW‖ after 20 AdamW steps, 3× under SGD); the initializer's A is replaced.
  auto (default): inputs under merge=gainlora (GainLoRA+InfLoRA as its authors run it), project
    otherwise (their InfLoRA baseline); settled once the merge is known (Plugin.configure).
Composition with initializers (InfLoRA owns A): `project` takes the initializer's A and
projects it, which is faithful (A ⟂ M, frozen) and keeps what the initializer chose as far as the
memory allows; `inputs` replaces it outright. Either way, if the init was absorbed (SLICE,
LoRA-GA, PiSSA, ...: W = W_prev − s·B0·A0) the absorbed part is re-folded, W ← W + s·B0·(A0 − A)
(lora.replace_start_A_), so the model's function at t = 0 is unchanged (up to float rounding)
and the stage history records (A, B0) as the absorbed init; B starts at B0. Worth knowing: with A
frozen the stage's model is W_prev + s·(B − B0)·A, and AdamW without weight decay does not
depend on where B starts, so B0 has no effect: an absorbing initializer acts on InfLoRA only
through its A under `project`, and not at all under `inputs` (measured: equal losses to 5 digits).

Deviations from the authors' code: their later-task `inputs` rows are the left singular vectors
of P·C (the covariance projected on one side); ours are the principal directions of Ĥ_t (P·C·P),
the paper's. Their T5 code chunks d_in into blocks; ours treats each module's input as one block.
Cost per stage: the memory update (one no-grad pass over n_samples examples and one
eigendecomposition per module); `inputs` adds one such pass over the current task at the start.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..infra.errors import ConfigError
from ..lora import linalg
from ..lora.layers import lora_layers, replace_start_A_
from ..lora.representations import InputMemory, collect_input_grams
from ..stage import Plugin, Regularizer, StageContext

DESIGNS = ("auto", "project", "inputs")
INPUTS_ROW_NORM = 1.0 / math.sqrt(3.0)  # the authors' `lora_A /= sqrt(3)` on unit singular vectors


class InfLoRA(Regularizer):
    name = "inflora"
    sets_start_A = True  # InfLoRA owns A

    def __init__(
        self,
        threshold: float = 0.995,
        threshold_increment: float = 0.005 / 15,
        design: str = "auto",
        n_samples: int = 128,
        batch_size: int = 16,
        criterion: str = "covariance",
    ):
        where = "regularizer (inflora)"
        if design not in DESIGNS:
            raise ConfigError(f"{where}: design={design!r}; valid: {', '.join(DESIGNS)}")
        self.memory = InputMemory(threshold, threshold_increment, n_samples, batch_size, where, criterion)
        self.design = design

    def configure(self, plugins: Mapping[str, Plugin]) -> None:
        if self.design == "auto":
            merge = plugins.get("merge")
            self.design = "inputs" if getattr(merge, "name", None) == "gainlora" else "project"

    def begin_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        if self.design == "auto":  # built outside the runner (no merge known): the InfLoRA baseline
            self.design = "project"
        layers = lora_layers(model, ctx.adapter)
        if self.design == "inputs":
            new_A = self._designed_rows(model, layers, ctx)
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

    def _designed_rows(self, model: torch.nn.Module, layers, ctx: StageContext) -> dict[str, torch.Tensor]:
        """design=inputs: per module the r leading directions of the current task's inputs off the
        memory, each row at norm 1/√3 (linalg.principal_rows gives unit rows)."""
        n = min(self.memory.n_samples, len(ctx.current.train))
        bs = min(self.memory.batch_size, n)
        grams = collect_input_grams(model, layers, ctx.make_batches(ctx.current, -(-n // bs), bs, ctx.seed)).grams
        return {
            name: INPUTS_ROW_NORM * linalg.principal_rows(grams[name], self.memory.basis(name), layer.r[ctx.adapter])
            for name, layer in layers.items()
        }

    def end_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        self.memory.update(model, lora_layers(model, ctx.adapter), ctx)

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.memory.load_state_dict(state)

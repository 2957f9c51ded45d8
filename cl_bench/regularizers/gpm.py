"""GPM — Gradient Projection Memory (Saha, Garg & Roy, ICLR 2021) on LoRA factors.

Memory (representations.InputMemory): per target module, an orthonormal basis M [d_in, k] of
the module's inputs on earlier tasks (real tokens, prompt and answer, padding excluded), built
after each stage from n_samples training examples of the finished task through the finished
model: Eq. 16 for the first task, Eqs. 20–22 (residual after projecting onto M, criterion on the
total energy) after later ones, at ε_t = threshold + threshold_increment·(t − 1). Basis size: the
paper's rule, the smallest k whose energy reaches ε_t, at every task (`criterion: energy`; GPM's
code keeps one direction fewer on the first task, `sum(cumsum < ε)`); `criterion: covariance` is
the InfLoRA/GainLoRA authors' σ⁴ rule (linalg.CRITERIA).

Training on task t ≥ 2 (Eq. 18 carried to ΔW = s·B·A; linalg.gpm_lora_gradients derives it):
once per optimizer step, after the backward and before clipping (after_backward),
    ∇A ← ∇A − ∇A·M·Mᵀ,    ∇B ← ∇B − ∇B·Q·Qᵀ with Q = orth(A·M),
so that the step leaves s·B·A·x unchanged for x ∈ span M (Eq. 19). Under SGD this is exact to
all orders (∇A·M = 0 removes the second-order term ∇B·∇A·x and keeps A·M, hence Q, fixed).
The trainer's AdamW rescales each element by 1/√v, which does not commute with the projection:
measured on synthetic_conflict (FAST, vanilla init), ‖τ_2·M_1‖/‖τ_2‖ averaged 0.018 over modules
with the gradient projection alone, against 0.36 without GPM. project_update (default true)
therefore also projects each optimizer step itself (after_step, linalg.gpm_lora_pin: A·M and
B·Q stay at their stage-start values), which makes the protection exact under any optimizer
(measured 1e-7); it is a no-op under SGD. project_update=false is the gradient-only GPM.

project_init (default true; our addition, not in the GPM paper, which trains full weights):
before the first step of task t ≥ 2 the starting A is projected off M, each row kept at its norm
(linalg.project_rows), and an absorbed init is re-folded so the model is unchanged
(lora.replace_start_A_). Why: if A·M has rank r (any random A once k ≥ r), Q spans ℝ^r and ∇B ≡ 0;
with B0 = 0 (vanilla LoRA) ∇A = s·B0ᵀ·G = 0 as well and the stage would not train at all. With
A ⟂ M, Q is empty, B is free and A moves only inside M⟂: the whole rank-r update lives in GPM's
residual gradient space. project_init=false keeps the initializer's A (the literal projection).

The constraint holds for what the stage adds to W, τ_t = s·(B·A − B0·A0), under any initializer:
the pin keeps A·M = A0·M and B·Q = B0·Q, so for x = M·c, τ_t·x = s·(B − B0)·A0·M·c = 0 (A0·M·c ∈ col Q),
an absorbed −s·B0·A0 included (with project_init, A0·M = 0 outright). Tested on τ_2 with initializer=slice.

Cost per stage: one no-grad forward pass over n_samples examples at stage end plus one
eigendecomposition of a [d_in, d_in] Gram per module; per step and module a few [r, d_in]×[d_in, k]
and [d_out, r]×[r, q] products (the r×k SVD for Q once per stage). Memory: the bases (see InputMemory) on the training device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..lora import linalg
from ..lora.layers import lora_layers, replace_start_A_
from ..lora.representations import InputMemory
from ..stage import Regularizer, StageContext


class GPM(Regularizer):
    name = "gpm"

    def __init__(
        self,
        threshold: float = 0.97,
        threshold_increment: float = 0.003,
        n_samples: int = 128,
        batch_size: int = 16,
        project_init: bool = True,
        project_update: bool = True,
        rtol: float = 1e-5,
        criterion: str = "energy",
    ):
        self.memory = InputMemory(threshold, threshold_increment, n_samples, batch_size, "regularizer (gpm)", criterion)
        self.project_init, self.project_update, self.rtol = bool(project_init), bool(project_update), float(rtol)
        self._active: dict[str, dict[str, torch.Tensor]] = {}  # per module: A, B, M, Q, A0·M, B0·Q

    @property
    def sets_start_A(self) -> bool:
        return self.project_init

    def begin_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        """Project the starting A (project_init) and fix, per module, the stage-start A0·M, Q, B0·Q.

        All of it is recomputed from the deterministic start on resume, so no mid-stage state."""
        self._active = {}
        layers = lora_layers(model, ctx.adapter)
        bases = {n: M for n in layers if (M := self.memory.basis(n)) is not None}
        if not bases:
            return
        if self.project_init:
            new_A = {n: linalg.project_rows(layers[n].lora_A[ctx.adapter].weight, M) for n, M in bases.items()}
            replace_start_A_(model, ctx.adapter, new_A, ctx.master, ctx.init_absorbed)
        for n, M in bases.items():
            A, B = layers[n].lora_A[ctx.adapter].weight, layers[n].lora_B[ctx.adapter].weight
            M = M.to(device=A.device, dtype=torch.float32)
            Q = linalg.lora_input_basis(A, M, self.rtol)
            self._active[n] = {
                "A": A,
                "B": B,
                "M": M,
                "Q": Q,
                "AM0": A.detach().float() @ M,
                "BQ0": B.detach().float() @ Q,
            }

    @torch.no_grad()
    def after_backward(self, model: torch.nn.Module, ctx: StageContext) -> None:
        for m in self._active.values():
            A, B = m["A"], m["B"]
            if A.grad is None or B.grad is None:
                continue
            gA, gB = linalg.gpm_lora_gradients(A.grad, B.grad, m["M"], m["Q"])
            A.grad.copy_(gA)
            B.grad.copy_(gB)

    @torch.no_grad()
    def after_step(self, model: torch.nn.Module, ctx: StageContext) -> None:
        if not self.project_update:
            return
        for m in self._active.values():
            A, B = linalg.gpm_lora_pin(m["A"], m["B"], m["M"], m["Q"], m["AM0"], m["BQ0"])
            m["A"].copy_(A)
            m["B"].copy_(B)

    def end_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        self._active = {}
        self.memory.update(model, lora_layers(model, ctx.adapter), ctx)

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.memory.load_state_dict(state)

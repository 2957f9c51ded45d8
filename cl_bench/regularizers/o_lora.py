"""O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual
Learning"): keep the new LoRA's row space orthogonal to every earlier task's.

    L = L_LM + λ1 · Σ_m Σ_{i<t} ‖A_t,m · A_i,mᵀ‖ + λ2 · Σ_m (‖A_t,m‖_F + ‖B_t,m‖_F)

A [r, d_in] is the LoRA down-projection (the paper's A ∈ R^{d×r} transposed; its Eq. 7:
O_{i,t} = A_iᵀ A_t = 0). A_i are the TRAINED A's of earlier stages, from ctx.history[i].trained
(so after a SLICE / LoRA-GA init they include the init's A0), A_t the live adapter's.

Which norm (`norm`):
  * `abs` (default) — Σ_jk |[A_t A_iᵀ]_jk|, what the O-LoRA code computes
    (`torch.abs(torch.mm(lora_A, loranew_A.T)).sum()` in its uie_trainer_lora.py, GitHub
    cmnfriend/O-LoRA) and so what produced its published numbers;
  * `fro_sq` — Σ_jk [A_t A_iᵀ]²_jk, the paper's Eq. 8 (‖O_{i,t}[j,k]‖² summed) and the SLICE
    authors' reimplementation (cl_lora/cl_methods/o_lora.py in RamiroNB/slice).
The L2 term is that code's `torch.norm(param, p=2)` summed over the new lora_A and lora_B
tensors: the Frobenius norm of each, NOT squared. Reductions: sums over r×r entries, over
earlier stages and over modules. Defaults λ1 = 0.5, λ2 = 0 (O-LoRA's scripts; the SLICE
reference uses λ = 0.5 and no L2 term). The terms are logged as `orth` and `l2` (already
multiplied by λ1, λ2).

Unlike O-LoRA, which keeps every earlier adapter in the forward pass, cl_bench by default folds
them into W after each stage (merge=absorb); the earlier A's are then only the penalty's anchor,
as in the SLICE reference. Under a branch-keeping merge (merge=gainlora: GainLoRA+O-LoRA, the
paper's variant) an earlier stage's adapter is still in the model; if that stage's init was
absorbed, its branch also carries the init term −s·B0·A0 in the forward pass (GainLoRA's frozen
companion adapter), i.e. a second earlier LoRA whose A0 is not the trained A. O-LoRA constrains
the new A against every earlier LoRA of the forward pass, so for a kept stage with an absorbed
init the anchor is [A_i; A0_i] (A0 from ctx.history[i].init). A folded stage keeps the anchor A_i
alone (main's behaviour). Whether stage i is kept is read off the model: its adapter name
(history[i].adapter) is still a LoRA of the layer. No state of its own: the A's come from the
history, which resume restores. Memory: the earlier A's, (t−1)·r·d_in float32 per module (twice
that for kept absorbed branches), on the device.
"""

from __future__ import annotations

import torch

from ..infra.errors import ConfigError
from ..stage import Regularizer, StageContext
from .base import StageDelta

NORMS = ("abs", "fro_sq")


def orthogonality(A_new: torch.Tensor, A_prev: torch.Tensor, norm: str = "abs") -> torch.Tensor:
    """Σ over the entries of A_new·A_prevᵀ of |x| (norm=abs) or x² (norm=fro_sq), 0-d.

    A_new [r, d_in]; A_prev [k, d_in] (earlier stages' A stacked along rows: the sum over
    stages is the sum over row blocks). 0 exactly when every row of A_new is orthogonal to
    every row of A_prev. Raises ValueError for an unknown norm.
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}; valid: {', '.join(NORMS)}")
    overlap = A_new @ A_prev.T
    return overlap.abs().sum() if norm == "abs" else overlap.pow(2).sum()


def anchor_rows(history, module: str, adapters_in_model: set[str]) -> list[torch.Tensor]:
    """The earlier A's of `module` the new A must be orthogonal to, each [r_i, d_in]: per stage
    its trained A, plus its absorbed init's A0 when the stage's adapter is still in the model
    (a kept branch carries −s·B0·A0 in the forward pass; see the module docstring)."""
    rows = []
    for record in history:
        rows.append(record.trained[module][0])
        init = record.init
        if record.adapter in adapters_in_model and init is not None and module in init:
            rows.append(init[module][0])
    return rows


class OLoRA(Regularizer):
    """O-LoRA's orthogonality (and L2) terms; see the module docstring."""

    name = "o_lora"

    def __init__(self, lambda_1: float = 0.5, lambda_2: float = 0.0, norm: str = "abs"):
        for key, value in (("lambda_1", lambda_1), ("lambda_2", lambda_2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"regularizer.{key}={value!r} must be a number >= 0")
        if norm not in NORMS:
            raise ConfigError(f"regularizer.norm={norm!r} is invalid; valid: {', '.join(NORMS)}")
        self.lambda_1, self.lambda_2, self.norm = float(lambda_1), float(lambda_2), norm
        self.adapter: StageDelta | None = None
        self.previous: dict[str, torch.Tensor] = {}

    def begin_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        self.adapter = StageDelta(model, ctx)  # only for its live (A, B) per module
        self.previous = (
            {
                name: torch.cat(anchor_rows(ctx.history, name, set(layer.lora_A))).to(ctx.device)
                for name, layer in self.adapter.layers.items()
            }
            if ctx.history
            else {}
        )

    def loss(self, model, batch, ctx: StageContext) -> dict[str, torch.Tensor]:
        with torch.autocast(ctx.device.type, enabled=False):
            orth = l2 = 0.0
            for name in self.adapter.modules:
                A, B = self.adapter.factors(name)
                if name in self.previous:
                    orth = orth + orthogonality(A.float(), self.previous[name], self.norm)
                if self.lambda_2:
                    l2 = l2 + torch.linalg.matrix_norm(A.float()) + torch.linalg.matrix_norm(B.float())
        if not torch.is_tensor(orth):  # stage 1: no earlier A, the term is 0
            orth = torch.zeros((), device=ctx.device)
        terms = {"orth": self.lambda_1 * orth}
        if self.lambda_2:
            terms["l2"] = self.lambda_2 * l2
        return terms

    def end_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        self.adapter, self.previous = None, {}

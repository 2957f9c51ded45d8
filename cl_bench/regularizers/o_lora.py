"""O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual
Learning"): keep the new LoRA's row space orthogonal to every earlier task's.

    L = L_LM + λ1 · Σ_m Σ_{i<t} ‖A_t,m · A_i,mᵀ‖ + λ2 · Σ_m (‖A_t,m‖_F + ‖B_t,m‖_F)

A [r, d_in] is the LoRA down-projection (the paper's A ∈ R^{d×r} transposed; its Eq. 7:
O_{i,t} = A_iᵀ A_t = 0), A_t the live adapter's.

What is kept orthogonal: what each stage adds to W. Stage i adds τ_i = s·(B_i·A_i − B0_i·A0_i)
(stage.StageRecord.task_vector), whose rows lie in span(A_i) + span(A0_i); with an init that
absorbs nothing (vanilla, EVA: B0 = 0) that is span(A_i), O-LoRA's own case. An absorbing init
(LoRA-GA, SLICE, PiSSA, MiLoRA, OLoRA, CorDA, LoRAM: W ← W − s·B0·A0) puts the part −s·B0·A0 of
the update in span(A0), which the penalty on A alone cannot move: measured before this rule
(`experiment=debug regularizer=o_lora regularizer.lambda_1=5.0 trainer.max_steps=48
sequence.n_train=128`), the share of τ_t's energy in the row space of the earlier stages'
updates was 0.63 / 0.70 / 0.74 at stages 2 / 3 / 4 with initializer=lora_ga against 0.03 / 0.06 /
0.11 with vanilla (a random subspace: 0.06 / 0.11 / 0.17): a run labelled O-LoRA without the
orthogonality. Hence, for every module:
  * anchors: per earlier stage i its trained A_i, plus its absorbed init's A0_i when stage i
    absorbed one (from ctx.history[i].init) — together they span τ_i's rows;
  * an absorbed init of THIS stage starts off them: before the first step (begin_stage) the
    rows of A0 are projected off the anchors' row space and rescaled to their norms
    (linalg.project_rows, as GPM's project_init and InfLoRA's `project` design), and the absorbed
    part is re-folded (lora.replace_start_A_), so the model is unchanged and the history records
    the projected A0. Then span(A0) ⟂ anchors exactly and the penalty keeps A_t near it, as for a
    vanilla init (measured after, same command: 0.014 / 0.010 / 0.008 with lora_ga).
    With a vanilla init nothing is projected: O-LoRA's code does not touch the starting A.

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

Per-stage λ: `lambda_1` and `lambda_2` take a number (every stage) or a list with one value per
stage, stage t using entry t (the authors' long-sequence script, cmnfriend/O-LoRA
logs_and_outputs/long_olora/hyparam.sh, sets λ1 = 0, 0.5 ×8, 5 ×6 and λ2 = 0, 0, 0, 0, 0.1, 0.1,
0.3, 0, 0.1, 0, 0, 0.1, 0, 0.1, 0.3 over its 15 tasks). A list shorter than the sequence is refused
at the start of stage 1, before any training.

Unlike O-LoRA, which keeps every earlier adapter in the forward pass, cl_bench by default folds
them into W after each stage (merge=absorb); the earlier A's are then only the penalty's anchor,
as in the SLICE reference. Under a branch-keeping merge (merge=gainlora: GainLoRA+O-LoRA, the
paper's variant) an earlier stage's adapter stays in the model, with its absorbed init as a
frozen companion branch (A0, −B0) under the same gate: the same rows as τ_i's, so the same
anchors. No state of its own: the A's come from the history, which resume restores, and the
projected start is recomputed from it. Memory: the earlier A's, (t−1)·r·d_in float32 per module
(twice that for stages with an absorbed init), on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..infra.errors import ConfigError
from ..lora import linalg
from ..lora.layers import replace_start_A_
from ..stage import Regularizer, StageContext
from .base import StageDelta

NORMS = ("abs", "fro_sq")


def _schedule(key: str, value: Any) -> list[float]:
    """A λ as a list: [v] for a number, the values of a per-stage list; each a number >= 0."""
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
        raise ConfigError(f"regularizer.{key}={value!r} must be a number >= 0 or a list of them, one per stage")
    return [float(v) for v in values]


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


def anchor_rows(history, module: str) -> list[torch.Tensor]:
    """The rows of `module` the new stage's update must be orthogonal to, each [r_i, d_in]: per
    earlier stage its trained A, plus its absorbed init's A0 when it absorbed one (τ_i's rows lie
    in span(A_i) + span(A0_i); see the module docstring)."""
    rows = []
    for record in history:
        rows.append(record.trained[module][0])
        init = record.init
        if init is not None and module in init:
            rows.append(init[module][0])
    return rows


def row_basis(rows: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """Orthonormal basis [d_in, q] of the row space of `rows` [k, d_in] (float32; singular values
    above rtol·‖rows‖_F: rounding-level directions are not a constraint)."""
    R = rows.detach().float()
    return linalg.range_basis(R.T, rtol * float(R.norm()))


class OLoRA(Regularizer):
    """O-LoRA's orthogonality (and L2) terms; see the module docstring."""

    name = "o_lora"
    sets_start_A = True  # an absorbed init's A0 starts off the earlier updates

    def __init__(
        self, lambda_1: float | Sequence[float] = 0.5, lambda_2: float | Sequence[float] = 0.0, norm: str = "abs"
    ):
        self.schedule = {key: _schedule(key, value) for key, value in (("lambda_1", lambda_1), ("lambda_2", lambda_2))}
        if norm not in NORMS:
            raise ConfigError(f"regularizer.norm={norm!r} is invalid; valid: {', '.join(NORMS)}")
        self.norm = norm
        self.lambda_1, self.lambda_2 = (self.schedule[k][0] for k in ("lambda_1", "lambda_2"))  # stage 1's
        self.adapter: StageDelta | None = None
        self.previous: dict[str, torch.Tensor] = {}

    def _set_stage_lambdas(self, ctx: StageContext) -> None:
        """λ1, λ2 of stage ctx.stage; a list shorter than the sequence is refused at stage 1."""
        for key, values in self.schedule.items():
            if len(values) > 1 and len(values) < len(ctx.tasks):
                raise ConfigError(
                    f"regularizer.{key} lists {len(values)} values for {len(ctx.tasks)} stages; give one per stage or a number"
                )
        pick = lambda values: values[ctx.stage - 1] if len(values) > 1 else values[0]  # noqa: E731
        self.lambda_1, self.lambda_2 = pick(self.schedule["lambda_1"]), pick(self.schedule["lambda_2"])

    def begin_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        self._set_stage_lambdas(ctx)
        self.adapter = StageDelta(model, ctx)  # only for its live (A, B) per module
        self.previous = {}
        if not ctx.history:
            return
        for name in self.adapter.layers:
            self.previous[name] = torch.cat(anchor_rows(ctx.history, name)).to(ctx.device)
        if ctx.init_absorbed:  # −s·B0·A0 is part of this stage's update: start A0 off the anchors
            new_A = {
                name: linalg.project_rows(layer.lora_A[ctx.adapter].weight, row_basis(self.previous[name]))
                for name, layer in self.adapter.layers.items()
            }
            done = replace_start_A_(model, ctx.adapter, new_A, ctx.master, True)
            ctx.log(
                f"stage {ctx.stage}: o_lora started the absorbed init's A off the earlier updates' rows in "
                f"{done['modules']} modules (re-folded ‖s·B0·(A0 − A)‖_F = {done['refolded_fro']:.3g})"
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

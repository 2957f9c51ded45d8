"""PS-LoRA's parameter-stability loss (PS-LoRA paper, "Stability Matters", Eq. 4; docs/design.md §9).

    L_s = Σ_m Σ_jk [ΔW_t]²_jk · (1 − tanh(α·[ΔW_t]_jk) · tanh(α·[P]_jk)),   P = Σ_{i<t} ΔW_i,
    L   = L_f + λ·L_s                                                   (§3.3, Algorithm 1)

per target module m, with ΔW_t = s·(B_t·A_t − B0·A0) the current stage's update (net of an
absorbed init: regularizers.base.StageDelta) and P the accumulated earlier updates, the sum of
the task vectors τ_i of ctx.history. Eq. 4 writes ‖A_t B_t‖²₂ · (1 − tanh(·)·tanh(·)), a norm
times a matrix; we read it, as the text around it says ("consistent element-wise signs ... the
resulting product tends toward 1"), as each element's square weighted by its own
sign-alignment factor, summed over the elements of each module and over the modules (the
reduction is a SUM, not a mean, as ‖·‖²₂ is). The ablations of Table 12 (App. D.3):
`terms: magnitude` keeps factor (a) alone, Σ ΔW²; `terms: sign` keeps factor (b) alone,
Σ (1 − tanh·tanh) (a constant offset of one per element, which moves no gradient).

The value: 0 exactly when ΔW_t = 0 (at every stage start); ≥ 0 always; for an element whose
sign matches P's it tends to 0 as α·|ΔW|, α·|P| grow (tanh saturates to ±1), and for an opposite
sign to 2·ΔW² (the saturated maximum). At stage 1, P = 0 and L_s = Σ ΔW² (pure magnitude).

Defaults: λ = 0.001, the paper's value for the 4-task standard sequences (App. C.1; 0.1 for
long ones on T5, 0.01 on LLaMA-2; robust in [0.001, 0.1], Table 13). The paper names the
temperature α but gives no value; ours (`temperature`) is chosen so that tanh acts as a soft
sign at the size of LoRA updates (elements of ~1e-3: α·|ΔW| ≈ 1), see conf/regularizer/ps_loss.yaml.
The paper's merge (Eq. 5, magnitude-selected) is a separate choice: `merge=`.

Memory: P, one float32 tensor per target weight, on the device (Llama-3.2-3B with all seven
projections: 11.3 GB; with q,v only, as in the paper: 0.8 GB). Each step computes ΔW_t per
module (one rank-2r product) under activation checkpointing, so only one module's
[d_out, d_in] intermediates are alive at a time. No state of its own: P comes from the history,
which resume restores.
"""

from __future__ import annotations

import torch

from ..infra.errors import ConfigError
from ..stage import Regularizer, StageContext
from .base import StageDelta, fp32_penalty

TERMS = ("both", "magnitude", "sign")


def parameter_stability(
    delta: torch.Tensor, previous: torch.Tensor | None, alpha: float, terms: str = "both"
) -> torch.Tensor:
    """PS-LoRA Eq. 4 for one module, summed over its elements (0-d).

    delta = ΔW_t, previous = Σ_{i<t} ΔW_i (None = no earlier stage, i.e. 0), both [d_out, d_in];
    alpha = the temperature α > 0; terms = both | magnitude | sign (Table 12's ablations).
    Raises ValueError for an unknown `terms`.
    """
    if terms not in TERMS:
        raise ValueError(f"terms={terms!r}; valid: {', '.join(TERMS)}")
    if terms == "magnitude":
        return delta.pow(2).sum()
    if previous is None:  # tanh(α·0) = 0: the alignment factor is 1 everywhere
        align = torch.ones_like(delta)
    else:
        align = 1.0 - torch.tanh(alpha * delta) * torch.tanh(alpha * previous)
    if terms == "sign":
        return align.sum()
    return (delta.pow(2) * align).sum()


class PSLoss(Regularizer):
    """λ·L_s (PS-LoRA Eq. 4), logged as `ps_loss`; see the module docstring."""

    name = "ps_loss"

    def __init__(self, lam: float = 0.001, temperature: float = 1000.0, terms: str = "both"):
        for key, value in (("lam", lam), ("temperature", temperature)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"regularizer.{key}={value!r} must be a number > 0")
        if terms not in TERMS:
            raise ConfigError(f"regularizer.terms={terms!r} is invalid; valid: {', '.join(TERMS)}")
        self.lam, self.alpha, self.terms = float(lam), float(temperature), terms
        self.delta: StageDelta | None = None
        self.previous: dict[str, torch.Tensor] = {}

    def begin_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        self.delta = StageDelta(model, ctx)
        self.previous = {}
        if ctx.history and self.terms != "magnitude":
            for name in self.delta.modules:
                self.previous[name] = torch.stack(ctx.history.task_vectors(name)).sum(0).to(ctx.device)

    def loss(self, model, batch, ctx: StageContext) -> dict[str, torch.Tensor]:
        delta = self.delta
        total = 0.0
        for name in delta.modules:
            previous = self.previous.get(name)
            total = total + fp32_penalty(
                lambda A, B, name=name, previous=previous: parameter_stability(
                    delta.of(name, A, B), previous, self.alpha, self.terms
                ),
                *delta.factors(name),
            )
        return {"ps_loss": self.lam * total}

    def end_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        self.delta, self.previous = None, {}  # free P before the merge and evaluation

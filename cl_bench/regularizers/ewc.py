"""Elastic weight consolidation (Kirkpatrick et al. 2017, Eq. 3) on the adapted weights, with
the online variant (Schwarz et al. 2018, "Progress & Compress", §2.2).

What is anchored. Every stage trains a fresh LoRA adapter and the earlier ones are folded into
the target weights W, so the parameters that carry earlier tasks are the W's themselves, and
the only ones that move in stage t are ΔW_t = s·(B_t·A_t − B0·A0) (regularizers.base.StageDelta:
what the stage has added to W, 0 at its start). The penalty is therefore the EWC quadratic on
W, anchored at θ* = the target weights at the start of the stage (the weights every earlier
stage left), expressed through ΔW_t:

    L = L_LM + (λ/2) · Σ_m Σ_jk [F̃_m]_jk · [ΔW_t,m]²_jk          (Kirkpatrick Eq. 3, on W)
    F̃ ← γ·F̃ + F_t  after each stage t                           (Schwarz Eq. 8's running F)

One anchor with accumulated Fishers is the recursive Laplace posterior (Huszár 2018, PNAS,
"Note on the quadratic penalties in EWC"), which Kirkpatrick et al.'s reply accepts as the
correct multi-task form; `gamma` = 1 sums the Fishers (that form), `gamma` < 1 decays older ones
(online EWC). Kirkpatrick's original separate penalty per task, each at its own θ*_i, would
need one Fisher and one anchor per task and is not implemented.

F_t is the diagonal EMPIRICAL Fisher of task t's training data at the weights stage t ended
with (end_stage, before the merge), for every target weight W [d_out, d_in]:
F_t = (1/N) Σ_n (∂ℓ_n/∂W)², ℓ_n the mean token negative log-likelihood of training example n
(one example per backward pass: per-EXAMPLE gradients, not per batch), N = `fisher_samples`
examples (capped at the training split) drawn with the stage seed, model in eval mode (no
dropout), gradients accumulated in float32. The per-example loss is a token mean, like the LM
loss it is added to, so λ does not depend on answer length.

Memory: F̃, one float32 tensor per target weight on the device (Llama-3.2-3B with all seven
projections: 2.82 G elements = 11.3 GB; q,v only: 0.8 GB), and the same again on disk in every
stage's and in-stage checkpoint's regularizer.safetensors (its state). The penalty is computed
per module under activation checkpointing (one module's [d_out, d_in] intermediates at a time).
Time: N extra forward+backward passes of one example at the end of every stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..infra.errors import ConfigError
from ..lora.layers import base_weight, lora_layers
from ..lora.weight_grads import HookedWeightGradients, weight_grad_hooks
from ..stage import Regularizer, StageContext
from .base import StageDelta, fp32_penalty


def _model_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return model(**batch).loss


def empirical_fisher(
    model: torch.nn.Module,
    weights: Mapping[str, torch.nn.Parameter],
    batches: Iterable[Any],
    *,
    loss_of: Callable[[torch.nn.Module, Any], torch.Tensor] = _model_loss,
    transposed: Iterable[str] = (),
    into: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher (1/N) Σ_n (∂ loss_of(model, batch_n) / ∂W)² per weight W.

    One term per batch: pass batches of one example for the per-example Fisher. Float32, in
    [d_out, d_in] layout (`transposed` names weights stored [d_in, d_out]), on each weight's
    device. Only the given weights get gradients (every other parameter is frozen meanwhile);
    each gradient is squared into its accumulator as soon as backward produces it and freed.
    With `into`, the result is added to those tensors in place (no second copy). The model runs
    in eval mode; its requires_grad flags and mode are restored. Raises ValueError on no batches.
    Sharded weights (distributed=fsdp, DTensors: no .grad of their own) take each pass's gradient
    from their modules' inputs and output gradients (weight_grads.py); every rank runs every pass.
    """
    from torch.distributed.tensor import DTensor

    batches = list(batches)
    if not batches:
        raise ValueError("empirical_fisher got no batches")
    transposed = set(transposed)
    acc = {} if into is None else into
    for name, w in weights.items():
        shape = tuple(w.shape[::-1]) if name in transposed else tuple(w.shape)
        if name not in acc:
            acc[name] = torch.zeros(shape, dtype=torch.float32, device=w.device)
    if any(isinstance(w, DTensor) for w in weights.values()):
        was_training = model.training
        model.eval()
        try:
            with HookedWeightGradients(model, weights, transposed=transposed) as hooked, torch.enable_grad():
                for batch in batches:
                    loss_of(model, batch).backward()
                    for name, g in hooked.pop().items():
                        acc[name].addcmul_(g, g, value=1.0 / len(batches))
        finally:
            model.train(was_training)
        return acc

    def square_into(name: str, grad: torch.Tensor) -> None:
        g = grad.detach().float()
        g = g.T if name in transposed else g
        acc[name].addcmul_(g, g, value=1.0 / len(batches))

    was_training = model.training
    try:
        model.eval()
        with weight_grad_hooks(model, weights, square_into), torch.enable_grad():
            for batch in batches:
                loss_of(model, batch).backward()
    finally:
        model.train(was_training)
    return acc


def ewc_penalty(fisher: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """½ Σ_jk F_jk · Δ_jk² (Kirkpatrick Eq. 3 without λ), Δ = θ − θ*; 0-d."""
    return 0.5 * (fisher * delta.pow(2)).sum()


class EWC(Regularizer):
    """λ·½ Σ F̃ ⊙ ΔW_t², logged as `ewc`; see the module docstring."""

    name = "ewc"
    sharded_weights = True  # a sharded W's per-example gradient comes from its module's hooks (empirical_fisher)

    def __init__(self, lam: float = 1.0e4, gamma: float = 1.0, fisher_samples: int = 64):
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
            raise ConfigError(f"regularizer.lam={lam!r} must be a number >= 0")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
            raise ConfigError(
                f"regularizer.gamma={gamma!r} must be a number in [0, 1] (1 = Fishers summed, < 1 = online EWC)"
            )
        if isinstance(fisher_samples, bool) or not isinstance(fisher_samples, int) or fisher_samples < 1:
            raise ConfigError(f"regularizer.fisher_samples={fisher_samples!r} must be an integer >= 1")
        self.lam, self.gamma, self.fisher_samples = float(lam), float(gamma), fisher_samples
        self.fisher: dict[str, torch.Tensor] = {}  # F̃ per target module (unwrapped-model names)
        self.tasks: list[str] = []  # the tasks whose Fisher F̃ holds, in order
        self.delta: StageDelta | None = None

    def _fisher_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        for name, f in self.fisher.items():  # moves once after a load (state is read onto the CPU)
            self.fisher[name] = f.to(device)  # a no-op when already there
        return self.fisher

    def begin_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        self.delta = StageDelta(model, ctx)
        self._fisher_on(ctx.device)

    def loss(self, model, batch, ctx: StageContext) -> dict[str, torch.Tensor]:
        if not self.fisher:  # stage 1: nothing to protect yet
            return {"ewc": torch.zeros((), device=ctx.device)}
        fisher, delta = self._fisher_on(ctx.device), self.delta
        total = 0.0
        for name in delta.modules:
            total = total + fp32_penalty(
                lambda A, B, name=name: ewc_penalty(fisher[name], delta.of(name, A, B)), *delta.factors(name)
            )
        return {"ewc": self.lam * total}

    def end_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        start = time.perf_counter()
        layers = lora_layers(model, ctx.adapter)
        n = min(self.fisher_samples, len(ctx.current.train))
        batches = ctx.make_batches(ctx.current, n, 1, ctx.seed)  # n distinct examples, one per batch
        fisher = self._fisher_on(ctx.device)
        for f in fisher.values():
            f.mul_(self.gamma)
        empirical_fisher(
            model,
            {name: base_weight(layer) for name, layer in layers.items()},
            batches,
            transposed=[name for name, layer in layers.items() if layer.fan_in_fan_out],
            into=fisher,
        )
        self.tasks.append(ctx.current.name)
        self.delta = None
        mean = sum(float(f.sum()) for f in fisher.values()) / sum(f.numel() for f in fisher.values())
        ctx.log(
            f"ewc stage {ctx.stage}: Fisher of {ctx.current.name!r} on {n} training examples in "
            f"{time.perf_counter() - start:.2f} s; F̃ mean {mean:.3e}"
        )

    def state_dict(self) -> dict[str, Any]:
        if not self.fisher:
            return {}
        return {"tasks": list(self.tasks), **{f"fisher/{name}": f.detach().cpu() for name, f in self.fisher.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tasks = list(state.get("tasks", []))
        self.fisher = {k.split("/", 1)[1]: v.float() for k, v in state.items() if k.startswith("fisher/")}

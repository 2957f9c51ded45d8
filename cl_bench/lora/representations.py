"""Input representations of chosen modules on real tokens, as Gram matrices (not a plug-in).

GPM and InfLoRA keep a basis of the inputs that target modules saw on earlier tasks; GainLoRA's
gate memory does the same for its gate layers. They all collect here and reduce with
linalg.basis_update.

Which rows count: a forward pre-hook on each module receives its input x, [batch, seq, d_in] for
a token-wise Linear (a LoRA layer) or [batch, d_in] for a layer fed one pooled vector per example
(a gate). For token inputs only positions with attention_mask == 1 are kept: padding never enters,
and prompt and answer tokens both do, because at inference every real position's layer output
reaches the generated answer through attention, so protecting answer positions alone would leave
the prompt's outputs free to drift. Rows are summed as C = Σ x·xᵀ = R·Rᵀ in float64 (one [d_in, d_in]
matrix per module, on the input's device): its eigenvalues are the squared singular values of
the representation matrix R of the GPM paper, without ever holding R.

The model runs in eval mode under no_grad (dropout off, deterministic); its training flag is restored.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..infra.errors import ConfigError
from .linalg import CRITERIA, basis_update, stage_threshold


@dataclass
class InputGrams:
    grams: dict[str, torch.Tensor]  # module -> Σ x·xᵀ over its real-token inputs, [d_in, d_in] float64
    rows: dict[str, int]  # module -> number of input rows summed
    batches: int = 0
    seconds: float = 0.0


@torch.no_grad()
def collect_input_grams(
    model: torch.nn.Module, modules: Mapping[str, torch.nn.Module], batches: Iterable[dict[str, torch.Tensor]]
) -> InputGrams:
    """Run `batches` (input_ids, attention_mask, and labels when present) through `model` and return the
    Gram matrix of every module's inputs on real tokens (see the module docstring).

    Raises ValueError if a module's token input does not match the batch's attention mask, or if
    a module never ran (it is not on the forward path of `model`).
    """
    start = time.perf_counter()
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {name: 0 for name in modules}
    mask_now: list[torch.Tensor | None] = [None]

    def make_hook(name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))  # the input, passed by position or name
            mask = mask_now[0]
            if x.dim() == 3:
                if mask is None or tuple(mask.shape) != tuple(x.shape[:2]):
                    raise ValueError(
                        f"{name}: input {tuple(x.shape)} does not match attention_mask "
                        f"{None if mask is None else tuple(mask.shape)}"
                    )
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1]).double()
            g = x.T @ x
            grams[name] = g if name not in grams else grams[name].add_(g)
            rows[name] += x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            mask_now[0] = batch["attention_mask"]
            # labels too when the batch has them: a forward that depends on which tokens are the
            # prompt (GainLoRA's gates pool the prompt, told apart by label -100) then sees the
            # batch as training did; the loss it computes is discarded.
            extra = {"labels": batch["labels"]} if "labels" in batch else {}
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
            n += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [name for name in modules if name not in grams]
    if n and missing:
        raise ValueError(f"modules never ran in the forward pass: {missing[:3]}")
    return InputGrams(grams, rows, n, time.perf_counter() - start)


class InputMemory:
    """GPM's memory: per module, an orthonormal basis M [d_in, k] of the inputs it saw on earlier tasks.

    After each stage `update` collects the finished task's inputs (n_samples training examples,
    rounded up to whole batches, drawn with ctx.make_batches and the stage seed) through the model
    as it ends the stage, and grows each basis with linalg.basis_update at ε_t =
    linalg.stage_threshold(threshold, increment, t) under `criterion` (linalg.CRITERIA: "energy",
    GPM's paper; "covariance", the InfLoRA/GainLoRA authors' code). Bases live on the CPU in float32:
    Σ_modules d_in·k·4 bytes, at most Σ d_in²·4 (tiny model: 28 modules, ≤ 3.5 MB; Llama-3.2-3B with
    all seven projections: ≤ 28·(6·3072² + 8192²)·4 B ≈ 14 GB if every basis filled its space;
    memory ∝ k/d_in: on the tiny model at ε = 0.97 (+0.003/task) 8% of the dimensions after one
    task, 15–20% after four, 0.4–0.6 MB on synthetic_conflict). The collection holds
    one float64 Gram per module at once (2× that bound, ≈ 28 GB for the 3B model, while it runs).
    Shared by the gpm and inflora regularizers (and GainLoRA's gates).
    """

    def __init__(
        self,
        threshold: float,
        increment: float,
        n_samples: int,
        batch_size: int,
        where: str = "regularizer",
        criterion: str = "energy",
    ):
        try:
            stage_threshold(threshold, increment, 1)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if int(n_samples) < 1 or int(batch_size) < 1:
            raise ConfigError(f"{where}: n_samples={n_samples} and batch_size={batch_size} must be >= 1")
        if criterion not in CRITERIA:
            raise ConfigError(f"{where}: criterion={criterion!r} is invalid; valid: {', '.join(CRITERIA)}")
        self.threshold, self.increment, self.criterion = float(threshold), float(increment), criterion
        self.n_samples, self.batch_size = int(n_samples), int(batch_size)
        self.bases: dict[str, torch.Tensor] = {}
        self.stages: list[dict] = []  # per finished stage: ε_t, basis sizes, energy kept

    def basis(self, name: str) -> torch.Tensor | None:
        """M of a module, or None while it has no direction stored."""
        M = self.bases.get(name)
        return M if M is not None and M.shape[1] > 0 else None

    def update(self, model: torch.nn.Module, modules: Mapping[str, torch.nn.Module], ctx) -> dict:
        """Grow every module's basis with the inputs of ctx.current (GPM Eqs. 16, 20–22)."""
        n = min(self.n_samples, len(ctx.current.train))
        bs = min(self.batch_size, n)
        collected = collect_input_grams(model, modules, ctx.make_batches(ctx.current, -(-n // bs), bs, ctx.seed))
        eps = stage_threshold(self.threshold, self.increment, ctx.stage)
        sizes, kept = {}, []
        for name, gram in collected.grams.items():
            M, stats = basis_update(self.bases.get(name), gram, eps, self.criterion)
            self.bases[name] = M.cpu()
            sizes[name] = stats["k"]
            kept.append(stats["energy_kept"])
        summary = {
            "stage": ctx.stage,
            "threshold": eps,
            "criterion": self.criterion,
            "examples": collected.batches * bs,
            "k": sizes,
            "energy_kept_mean": sum(kept) / max(1, len(kept)),
            "seconds": round(collected.seconds, 3),
        }
        self.stages.append(summary)
        frac = sum(sizes.values()) / max(1, sum(int(g.shape[0]) for g in collected.grams.values()))
        ctx.log(
            f"stage {ctx.stage}: input memory at ε={eps:.4f} holds {frac:.1%} of the input dimensions "
            f"(k from {min(sizes.values(), default=0)} to {max(sizes.values(), default=0)})"
        )
        return summary

    def state_dict(self) -> dict:
        return {**{f"basis.{n}": M for n, M in self.bases.items()}, "memory_stages": self.stages}

    def load_state_dict(self, state: Mapping) -> None:
        self.bases = {k[len("basis.") :]: v.float().cpu() for k, v in state.items() if k.startswith("basis.")}
        self.stages = list(state.get("memory_stages", []))

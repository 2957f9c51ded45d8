"""Initializers PEFT implements natively: LoRA-GA (original), PiSSA, OLoRA, EVA, CorDA.

Each one only tells the runner which `init_lora_weights` (and sub-config) to put in the
LoraConfig and runs PEFT's own preprocessing / post-processing with our seeded, train-split-
only batches. PEFT does its own absorption where the method needs one (LoRA-GA, PiSSA,
OLoRA, CorDA modify the base weight so the wrapped model's function is unchanged; EVA keeps
B = 0), so `InitResult.factors` is None and the runner leaves the adapter as PEFT built it;
`absorb=True` tells it that PEFT absorbed s·B0·A0, so the stage history records the init and the
fp32 master of low-precision weights follows (lora.follow_peft_absorption_).

Note: PEFT's randomized SVDs (LoRA-GA, `pissa_niter_*`) draw from the global torch RNG, so
their determinism rests on the runner's per-stage seeding.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from peft import EvaConfig, LoraGAConfig, initialize_lora_eva_weights
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.loraga import preprocess_loraga

from ..infra.errors import ConfigError, TrainingError
from ..lora.layers import lora_layers
from ..stage import StageContext
from ..train.loss import trained_tokens
from .base import Initializer, InitResult, peak_memory_mb, reset_peak_memory


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"initializer.{key}={value!r} must be a positive integer")
    return value


def _choice(key: str, value: Any, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ConfigError(f"initializer.{key}={value!r}; valid: {', '.join(valid)}")
    return value


def _check_rank(name: str, module_shapes: dict[str, tuple[int, int]], rank: int, factor: int = 1) -> None:
    for module, (d_out, d_in) in module_shapes.items():
        if factor * rank > min(d_out, d_in):
            need = "2r" if factor == 2 else "r"
            raise ConfigError(f"lora.r={rank}: {name} needs {need} <= min(d_out, d_in) but {module} is {d_out}x{d_in}")


class _PeftNative(Initializer):
    """Shared bookkeeping: time spent before wrapping (PEFT preprocessing) and after."""

    sharded_weights = False  # PEFT's init rewrites whole base weights in place (W - s·B0·A0)

    init_lora_weights: str = ""
    # PEFT itself sets W ← W − s·B0·A0 while wrapping (the runner then only brings the fp32
    # master along); EVA starts with B = 0 and needs no absorption.
    absorbs: bool = True

    def __init__(self) -> None:
        self._before_wrap_seconds = 0.0

    def lora_config_kwargs(self) -> dict[str, Any]:
        return {"init_lora_weights": self.init_lora_weights}

    def validate(self, module_shapes: dict[str, tuple[int, int]], rank: int) -> None:
        _check_rank(self.name, module_shapes, rank)

    def before_wrap(self, model: torch.nn.Module, lora_config: Any, ctx: StageContext) -> None:
        # PEFT's SVD/QR inits run inside get_peft_model, right after this call.
        reset_peak_memory(ctx.device)

    def _stats(self, ctx: StageContext, extra: dict | None = None, init_seconds: float = 0.0) -> dict:
        return {
            "method": self.name,
            "init_lora_weights": self.init_lora_weights,
            "implementation": "peft",
            **(extra or {}),
            "seconds": {
                "preprocess": self._before_wrap_seconds,
                "init": init_seconds,
                "total": self._before_wrap_seconds + init_seconds,
            },
            "peak_memory_mb": peak_memory_mb(ctx.device),
        }

    def init(self, peft_model: torch.nn.Module, ctx: StageContext) -> InitResult:
        stats = self._stats(ctx)
        self._before_wrap_seconds = 0.0
        return InitResult(factors=None, absorb=self.absorbs, stats=stats)


class LoraGAPeft(_PeftNative):
    """PEFT's own LoRA-GA variant (peft.tuners.lora.layer.LoraLayer.lora_ga_init), for comparison
    with `lora_ga`. It is *not* LoRA-GA's original stable scaling:

    mean gradient G over the capture batches -> torch.svd_lowrank(G, q=min(4r, d), niter=4)
    (global RNG) -> with direction ArB2r: A = V[:, :r]ᵀ, B = U[:, r:2r]·diag(S[r:2r]), i.e. the
    gradient's singular values are folded into B -> scale=stable multiplies B only by
    d_out^(1/4)/√γ (A stays orthonormal) -> W ← W − s·B·A. scale=weight_svd multiplies B by
    σ_1(W)/S_B[0], gd_scale divides A and B by s, unit adds nothing (S stays in B).
    The original (Wang et al. 2024 §3.3; the authors' code) discards the singular values and
    multiplies both A and B by d_out^(1/4)/√γ: that is `initializer=lora_ga scale=stable`.
    Gradient singular values are small, so PEFT's initial adapter s·B·A is much smaller than the
    original's: ‖s·B·A‖_F summed over modules 3.9 vs 72.9 on the tiny model (r = 8, α = 16, rsLoRA,
    4×8 sentiment examples); the gap grows as the gradient's singular values shrink.
    """

    name = "lora_ga_peft"
    plain_targets = True  # PEFT preprocesses plain Linear targets (stage.Plugin)
    init_lora_weights = "lora_ga"
    DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
    SCALES = ("stable", "weight_svd", "gd_scale", "unit")

    def __init__(
        self,
        direction: str = "ArB2r",
        scale: str = "stable",
        stable_gamma: int = 16,
        capture_steps: int = 8,
        capture_batch_size: int = 16,
    ):
        super().__init__()
        self.direction = _choice("direction", direction, self.DIRECTIONS)
        self.scale = _choice("scale", scale, self.SCALES)
        self.stable_gamma = _positive_int("stable_gamma", stable_gamma)
        self.capture_steps = _positive_int("capture_steps", capture_steps)
        self.capture_batch_size = _positive_int("capture_batch_size", capture_batch_size)

    def lora_config_kwargs(self) -> dict[str, Any]:
        return {
            "init_lora_weights": "lora_ga",
            "lora_ga_config": LoraGAConfig(direction=self.direction, scale=self.scale, stable_gamma=self.stable_gamma),
        }

    def validate(self, module_shapes: dict[str, tuple[int, int]], rank: int) -> None:
        _check_rank(self.name, module_shapes, rank, factor=2)

    def before_wrap(self, model: torch.nn.Module, lora_config: Any, ctx: StageContext) -> None:
        start = time.perf_counter()
        reset_peak_memory(ctx.device)
        batches = list(ctx.make_batches(ctx.current, self.capture_steps, self.capture_batch_size, ctx.seed))
        n_items = sum(trained_tokens(b) for b in batches)

        def train_step() -> None:
            for batch in batches:
                # PEFT divides the accumulated gradient by the number of backward passes;
                # × len(batches) makes the result the token mean over all batches, like capture.py.
                loss = model(**batch, num_items_in_batch=n_items).loss * len(batches)
                if not torch.isfinite(loss):
                    raise TrainingError(f"lora_ga_peft gradient estimation: loss is {float(loss)}")
                loss.backward()

        preprocess_loraga(model, lora_config, train_step)
        self._before_wrap_seconds = time.perf_counter() - start

    def init(self, peft_model: torch.nn.Module, ctx: StageContext) -> InitResult:
        stats = self._stats(
            ctx,
            {
                "direction": self.direction,
                "scale": self.scale,
                "stable_gamma": self.stable_gamma,
                "capture": {
                    "task": ctx.current.name,
                    "steps": self.capture_steps,
                    "batch_size": self.capture_batch_size,
                },
            },
        )
        self._before_wrap_seconds = 0.0
        return InitResult(factors=None, absorb=self.absorbs, stats=stats)


class PiSSA(_PeftNative):
    """Principal singular components of W in the adapter, the residual in the base weight."""

    name = "pissa"

    def __init__(self, niter: int | None = None):
        super().__init__()
        # None: exact SVD; n: PEFT's fast randomized SVD with n subspace iterations.
        self.niter = None if niter is None else _positive_int("niter", niter)
        self.init_lora_weights = "pissa" if self.niter is None else f"pissa_niter_{self.niter}"


class OLoRA(_PeftNative):
    """Orthonormal init from the QR decomposition of W (B = Q[:, :r], A = R[:r])."""

    name = "olora"
    init_lora_weights = "olora"


class EVA(_PeftNative):
    """Explained-variance adaptation: A = top right singular vectors of the layer inputs on the
    current task, B = 0 (no absorption needed).

    Scaling with rank redistribution (rho > 1): modules end with different ranks r_m. With
    `adjust_scaling_factors` (EVA's default) every module keeps the configured scale s whatever its
    rank (EVA's purpose: all LoRA updates on one scale) - s = α/√r under rsLoRA, α/r otherwise;
    without it each module uses the configured convention at its own rank (α/√r_m or α/r_m).
    PEFT rescales α by r_m/r, which gives exactly that under α/r but α·√r_m/r under rsLoRA
    (2.8…8.0 instead of 5.66 at r = 8, α = 16), so the scale is set here per module.
    """

    name = "eva"
    plain_targets = True  # PEFT preprocesses plain Linear targets (stage.Plugin)
    init_lora_weights = "eva"
    absorbs = False

    def __init__(
        self,
        rho: float = 1.0,
        tau: float = 0.99,
        use_label_mask: bool = True,
        whiten: bool = False,
        adjust_scaling_factors: bool = True,
        batch_size: int = 16,
        steps: int = 8,
        max_forward_passes: int = 200,
    ):
        super().__init__()
        # rho = 1 keeps every module at rank r; rho > 1 lets EVA move rank between modules,
        # which gives adapters of different shapes per stage.
        if not isinstance(rho, (int, float)) or rho < 1.0:
            raise ConfigError(f"initializer.rho={rho!r} must be >= 1.0")
        if not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
            raise ConfigError(f"initializer.tau={tau!r} must lie in [0, 1]")
        self.rho, self.tau = float(rho), float(tau)
        self.use_label_mask, self.whiten = bool(use_label_mask), bool(whiten)
        self.adjust_scaling_factors = bool(adjust_scaling_factors)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.steps = _positive_int("steps", steps)
        self.max_forward_passes = _positive_int("max_forward_passes", max_forward_passes)

    def lora_config_kwargs(self) -> dict[str, Any]:
        return {
            "init_lora_weights": "eva",
            "eva_config": EvaConfig(
                rho=self.rho,
                tau=self.tau,
                use_label_mask=self.use_label_mask,
                whiten=self.whiten,
                adjust_scaling_factors=self.adjust_scaling_factors,
            ),
        }

    def init(self, peft_model: torch.nn.Module, ctx: StageContext) -> InitResult:
        start = time.perf_counter()
        batches = list(ctx.make_batches(ctx.current, self.steps, self.batch_size, ctx.seed))
        passes = 0

        # PEFT cycles the batches until every layer's SVD has converged; bound that loop.
        def forward(model, inputs):
            nonlocal passes
            passes += 1
            if passes > self.max_forward_passes:
                raise TrainingError(
                    f"eva: SVD did not converge within initializer.max_forward_passes={self.max_forward_passes} "
                    f"forward passes (tau={self.tau}); raise it or lower initializer.tau"
                )
            return model(**inputs)

        initialize_lora_eva_weights(
            peft_model, dataloader=batches, forward_fn=forward, adapter_name=ctx.adapter, show_progress_bar=False
        )
        rslora = ctx.scaling_convention == "rslora"
        scales = self.set_module_scales(
            lora_layers(peft_model, ctx.adapter), ctx.adapter, ctx.scaling, ctx.alpha, rslora
        )
        ranks = sorted({int(layer.r[ctx.adapter]) for layer in lora_layers(peft_model, ctx.adapter).values()})
        rule = (
            "configured s for every module"
            if self.adjust_scaling_factors
            else ("alpha/sqrt(r_module)" if rslora else "alpha/r_module")
        )
        stats = self._stats(
            ctx,
            {
                "rho": self.rho,
                "tau": self.tau,
                "forward_passes": passes,
                "ranks": ranks,
                "scaling": {"rule": rule, "min": min(scales.values()), "max": max(scales.values())},
            },
            init_seconds=time.perf_counter() - start,
        )
        self._before_wrap_seconds = 0.0
        return InitResult(factors=None, absorb=self.absorbs, stats=stats)

    def set_module_scales(
        self, layers: dict, adapter: str, scaling: float, alpha: float, rslora: bool
    ) -> dict[str, float]:
        """Set every module's scaling (and its α, so that the runner's lora.set_scaling, which
        recomputes s from α and r, gives it back) after EVA's rank redistribution; returns {module: scale}."""
        scales = {}
        for name, layer in layers.items():
            r_m = int(layer.r[adapter])
            per_rank = math.sqrt(r_m) if rslora else float(r_m)
            s_m = float(scaling) if self.adjust_scaling_factors else float(alpha) / per_rank
            layer.scaling[adapter] = s_m
            layer.lora_alpha[adapter] = s_m * per_rank
            scales[name] = s_m
        return scales


class CorDA(_PeftNative):
    """Context-oriented decomposition: SVD of W·C (C = input covariance on calibration data).

    ipm (instruction-previewed) adapts the principal components on current-task data; kpm
    (knowledge-preserved) adapts the minor ones and, in continual learning, is naturally
    calibrated on the previous tasks (`calibration: previous`; stage 1 has none and uses the
    current task, which the stats record).
    """

    name = "corda"
    plain_targets = True  # PEFT preprocesses plain Linear targets (stage.Plugin)
    init_lora_weights = "corda"
    METHODS = ("ipm", "kpm")
    CALIBRATIONS = ("current", "previous")

    def __init__(self, method: str = "ipm", calibration: str = "current", samples: int = 64):
        super().__init__()
        self.method = _choice("method", method, self.METHODS)
        self.calibration = _choice("calibration", calibration, self.CALIBRATIONS)
        self.samples = _positive_int("samples", samples)
        self._used: list[str] = []

    def lora_config_kwargs(self) -> dict[str, Any]:
        return {"init_lora_weights": "corda", "corda_config": CordaConfig(corda_method=self.method)}

    def before_wrap(self, model: torch.nn.Module, lora_config: Any, ctx: StageContext) -> None:
        start = time.perf_counter()
        reset_peak_memory(ctx.device)
        tasks = list(ctx.previous) if (self.calibration == "previous" and ctx.previous) else [ctx.current]
        self._used = [t.name for t in tasks]
        per_task = max(1, self.samples // len(tasks))
        # PEFT's covariance hook squeezes the batch dimension, so it must be fed one example at a time.
        batches = [b for t in tasks for b in ctx.make_batches(t, per_task, 1, ctx.seed)]

        @torch.no_grad()
        def run_model() -> None:
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

        preprocess_corda(model, lora_config, run_model=run_model)
        self._before_wrap_seconds = time.perf_counter() - start

    def init(self, peft_model: torch.nn.Module, ctx: StageContext) -> InitResult:
        stats = self._stats(
            ctx, {"corda_method": self.method, "calibration_tasks": self._used, "calibration": self.calibration}
        )
        self._before_wrap_seconds = 0.0
        return InitResult(factors=None, absorb=self.absorbs, stats=stats)

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

import time
from typing import Any

import torch
from peft import EvaConfig, LoraGAConfig, initialize_lora_eva_weights
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.loraga import preprocess_loraga

from ..errors import ConfigError, TrainingError
from ..lora import lora_layers
from ..stage import StageContext, trained_tokens
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
            raise ConfigError(
                f"lora.r={rank}: {name} needs {need} <= min(d_out, d_in) but {module} is {d_out}x{d_in}"
            )


class _PeftNative(Initializer):
    """Shared bookkeeping: time spent before wrapping (PEFT preprocessing) and after."""

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
    """PEFT's LoRA-GA (Wang et al. 2024) with its original stable scaling, for comparison with
    `lora_ga` (the SLICE paper's protocol: A = V[:, r:2r]ᵀ, B = U[:, :r], variance-matched β)."""

    name = "lora_ga_peft"
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
                "capture": {"task": ctx.current.name, "steps": self.capture_steps, "batch_size": self.capture_batch_size},
            }
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
    current task, B = 0 (no absorption needed)."""

    name = "eva"
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
        ranks = sorted({int(layer.r[ctx.adapter]) for layer in lora_layers(peft_model, ctx.adapter).values()})
        stats = self._stats(
            ctx,
            {"rho": self.rho, "tau": self.tau, "forward_passes": passes, "ranks": ranks},
            init_seconds=time.perf_counter() - start,
        )
        self._before_wrap_seconds = 0.0
        return InitResult(factors=None, absorb=self.absorbs, stats=stats)


class CorDA(_PeftNative):
    """Context-oriented decomposition: SVD of W·C (C = input covariance on calibration data).

    ipm (instruction-previewed) adapts the principal components on current-task data; kpm
    (knowledge-preserved) adapts the minor ones and, in continual learning, is naturally
    calibrated on the previous tasks (`calibration: previous`; stage 1 has none and uses the
    current task, which the stats record).
    """

    name = "corda"
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
            ctx,
            {"corda_method": self.method, "calibration_tasks": self._used, "calibration": self.calibration}
        )
        self._before_wrap_seconds = 0.0
        return InitResult(factors=None, absorb=self.absorbs, stats=stats)

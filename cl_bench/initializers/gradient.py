"""Gradient-based initializers: LoRA-GA (paper protocol) and SLICE.

Per stage, on the current (merged) weights with a fresh no-op adapter:
  1. G_cur = mean gradient of the current task's loss w.r.t. every target weight (fp32);
     SLICE also captures one G_k per previous task (same steps each) and takes
     G_prev = (1/K) Σ_k G_k — equal weight per task, as in the paper.
  2. SLICE: G̃ = ψ(G_cur, G_prev) (linalg.projection_plan / apply_plan); LoRA-GA: G̃ = G_cur.
  3. B = U[:, :r], A = V[:, r:2r]ᵀ from the (randomized, seeded per module) SVD of G̃.
  4. β-rescale so Var(B·A) = η_r·Var(W) (scale=variance_matched, the SLICE paper's Eq. 9), or
     LoRA-GA's original stable scale: A, B ← ζ·A, ζ·B with ζ = d_out^(1/4)/√γ (scale=stable);
     the runner's lora.apply_init absorbs s·B·A into W.
At stage 1 (no previous task) SLICE runs exactly LoRA-GA's computation (same batches, same
SVD seeds, same cache entries) and records `projection: "skipped: no previous task"`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..data.replay import check_buffer_size
from ..data.tasks.base import TaskData
from ..infra.errors import ConfigError
from ..lora import linalg
from ..lora.layers import as_out_in, base_weight, full_weight, lora_layers, module_shapes
from ..stage import StageContext
from .base import Initializer, InitResult, peak_memory_mb, reset_peak_memory
from .cache import TensorCache, batches_fingerprint, content_key, model_state_fingerprint
from .capture import capture_gradients

OFFLOAD_MODES = ("none", "previous", "all")


def _offload_mode(value: str | bool) -> str:
    """initializer.offload: where the fp32 gradient sets live on a CUDA run (no-op on the CPU).
    none: both on the device; previous (default): the previous tasks' mean on the CPU, moved to
    the device one module at a time, G_cur on the device (one full set on the device at most);
    all: every accumulator on the CPU, each backward's gradients moved there (least device
    memory, slowest). true/false = all/none (the former boolean)."""
    if value is True or value is False:
        return "all" if value else "none"
    if value not in OFFLOAD_MODES:
        raise ConfigError(f"initializer.offload={value!r} is invalid; valid: {', '.join(OFFLOAD_MODES)}")
    return value


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"initializer.{key}={value!r} must be a positive integer")
    return value


class LoraGA(Initializer):
    """LoRA-GA subspace with LoRAM-style magnitude (the SLICE paper's LoRA-GA baseline), or with
    LoRA-GA's own stable scale (`scale="stable"`, Wang et al. 2024 §3.3: both A and B times
    d_out^(1/4)/√stable_gamma, singular values discarded). The subspace is the SLICE selection
    B = U[:, :r], A = V[:, r:2r]ᵀ (PEFT's "A2rBr"; the LoRA-GA authors' default is "ArB2r")."""

    name = "lora_ga"
    SCALES = ("variance_matched", "stable")

    def __init__(
        self,
        capture_steps: int = 8,
        capture_batch_size: int = 16,
        svd: str = "randomized",
        niter: int = 4,
        offload: str | bool = "previous",
        scale: str = "variance_matched",
        stable_gamma: float = 16,
        capture_max_tokens: int | None = None,
    ):
        if scale not in self.SCALES:
            raise ConfigError(f"initializer.scale={scale!r}; valid: {', '.join(self.SCALES)}")
        if isinstance(stable_gamma, bool) or not isinstance(stable_gamma, (int, float)) or stable_gamma <= 0:
            raise ConfigError(f"initializer.stable_gamma={stable_gamma!r} must be a number > 0")
        self.scale, self.stable_gamma = scale, float(stable_gamma)
        self.capture_steps = _positive_int("capture_steps", capture_steps)
        self.capture_batch_size = _positive_int("capture_batch_size", capture_batch_size)
        if svd not in linalg.SVD_METHODS:
            raise ConfigError(f"initializer.svd={svd!r}; valid: {', '.join(linalg.SVD_METHODS)}")
        self.svd = svd
        self.niter = _positive_int("niter", niter)
        self.offload = _offload_mode(offload)
        self.capture_max_tokens = (
            None if capture_max_tokens is None else _positive_int("capture_max_tokens", capture_max_tokens)
        )

    # ------------------------------------------------------------------ validation
    def validate(self, module_shapes: dict[str, tuple[int, int]], rank: int) -> None:
        if rank < 2:
            raise ConfigError(
                f"lora.r={rank}: {self.name} rescales by η_r = log_m r, which is 0 at r = 1; use lora.r >= 2"
            )
        for name, (d_out, d_in) in module_shapes.items():
            if 2 * rank > min(d_out, d_in):
                raise ConfigError(
                    f"lora.r={rank}: {self.name} needs 2r <= min(d_out, d_in) but {name} is {d_out}x{d_in} "
                    f"(largest valid r: {min(d_out, d_in) // 2})"
                )

    # ------------------------------------------------------------------ knobs
    def _projection_knobs(self, has_previous: bool) -> dict | None:
        return None

    def _previous_tasks(self, ctx: StageContext) -> list[TaskData]:
        return []

    def _init_knobs(self, ctx: StageContext, has_previous: bool) -> dict:
        return {
            "selection": "lora_ga",
            "svd": self.svd,
            "niter": self.niter,
            "rank": ctx.rank,
            "seed": ctx.seed,
            "projection": self._projection_knobs(has_previous),
            "scale": [self.scale, self.stable_gamma if self.scale == "stable" else None],
        }

    # ------------------------------------------------------------------ the stage
    def init(self, peft_model: torch.nn.Module, ctx: StageContext) -> InitResult:
        start = time.perf_counter()
        reset_peak_memory(ctx.device)
        layers = lora_layers(peft_model, ctx.adapter)
        self.validate(module_shapes(layers), ctx.rank)
        # The cache key fingerprints the model's weights; a sharded rank holds only its rows of them.
        sharded = ctx.dist is not None and ctx.dist.sharded
        cache = TensorCache(None if sharded else ctx.cache_dir, ctx.log, ctx.dist)
        captures = _Captures(peft_model, layers, ctx, cache, offload=self.offload, max_tokens=self.capture_max_tokens)
        current = captures.plan(ctx.current, self.capture_steps, self.capture_batch_size)
        previous = [
            captures.plan(t, *self._previous_shape(), indices=self._previous_indices(ctx, t))
            for t in self._previous_tasks(ctx)
        ]
        has_previous = bool(previous)

        init_key = None
        if cache.enabled:
            init_key = content_key("init", current.key, [p.key for p in previous], self._init_knobs(ctx, has_previous))
            hit = cache.load("init", init_key, device=ctx.device)
            if hit is not None:
                return self._from_cache(hit, layers, has_previous, init_key, start, ctx.device)

        t0 = time.perf_counter()
        # Previous tasks first: while they are captured only their running sum and one capture
        # exist; then G_prev and G_cur. Never more than two full-size gradient sets at once.
        g_prev, prev_infos = captures.run_mean(previous) if previous else (None, [])
        g_cur, cur_info = captures.run(current)
        t_capture = time.perf_counter() - t0

        t0 = time.perf_counter()
        plans, proj_stats = self._reconcile(g_cur, g_prev, ctx)
        t_proj = time.perf_counter() - t0

        t0 = time.perf_counter()
        factors, svd_stats = self._factorize(layers, g_cur, g_prev, plans, ctx)
        t_svd = time.perf_counter() - t0
        del g_cur, g_prev

        stats: dict[str, Any] = {
            "method": self.name,
            "rank": ctx.rank,
            "svd": self.svd,
            "niter": self.niter,
            "scale": self.scale,
            **({"stable_gamma": self.stable_gamma} if self.scale == "stable" else {}),
            **proj_stats,
            **svd_stats,
            "capture": {"current": cur_info, "previous": prev_infos},
            "cache": {"init": "miss" if cache.enabled else "off", "key": init_key[:16] if init_key else None},
            "seconds": {
                "cache_key": captures.key_seconds,
                "capture": t_capture,
                "projection": t_proj,
                "svd": t_svd,
                "total": time.perf_counter() - start,
            },
            "peak_memory_mb": peak_memory_mb(ctx.device),
        }
        if init_key is not None:
            tensors = {f"{n}::{part}": t for n, (A, B) in factors.items() for part, t in (("A", A), ("B", B))}
            cache.save("init", init_key, tensors, {"stats": stats})
        return InitResult(factors=factors, absorb=True, stats=stats)

    def _from_cache(self, hit, layers, has_previous: bool, init_key: str, start: float, device) -> InitResult:
        tensors, meta = hit
        factors = {n: (tensors[f"{n}::A"], tensors[f"{n}::B"]) for n in layers}
        stats = dict(meta.get("stats", {}))
        stats["method"] = self.name
        if not has_previous:  # shared with lora_ga at stage 1: describe it as this method
            stats.update(self._no_projection_stats())
        for info in [stats.get("capture", {}).get("current", {}), *stats.get("capture", {}).get("previous", [])]:
            info["cache"] = "not run: init from cache"  # the stored info describes the original capture
        stats["cache"] = {"init": "hit", "key": init_key[:16]}
        stats["seconds"] = {"total": time.perf_counter() - start, "computed_originally": stats.get("seconds")}
        stats["peak_memory_mb"] = peak_memory_mb(device)
        return InitResult(factors=factors, absorb=True, stats=stats)

    def _reconcile(self, g_cur, g_prev, ctx: StageContext) -> tuple[dict[str, linalg.ModulePlan] | None, dict]:
        """ψ's per-module plans from per-module inner products (global scope sums them)."""
        if g_prev is None:
            return None, self._no_projection_stats()
        dots = {n: linalg.inner_products(g_cur[n], g_prev[n].to(g_cur[n].device)) for n in g_cur}
        plans, stats = linalg.projection_plan(dots, seed=ctx.seed, **self._projection_knobs(True))
        stats["projection"] = _describe(stats)
        gamma = f", gamma={stats['gamma']:.4g}" if stats["gamma"] is not None else ""
        ctx.log(
            f"{self.name} stage {ctx.stage}: cos(G_cur, G_prev)={stats['cos_global']:+.4f} -> {stats['projection']}{gamma}"
        )
        return plans, stats

    def _factorize(self, layers, g_cur, g_prev, plans, ctx: StageContext) -> tuple[dict, dict]:
        """Eq. 7 + Eq. 9 one module at a time, so G̃ never exists for all modules at once."""
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        mass_r = mass_2r = total_sq = 0.0
        betas: list[float] = []
        for name, layer in layers.items():
            r = int(layer.r[ctx.adapter])
            G = g_cur[name].to(ctx.device)
            if plans is not None:
                G = linalg.apply_plan(G, g_prev[name].to(ctx.device), plans[name])
            A, B, S = linalg.lora_ga_selection(
                G, r, method=self.svd, niter=self.niter, seed=linalg.module_seed(ctx.seed, name)
            )
            g_sq = float(G.double().pow(2).sum())
            total_sq += g_sq
            mass_r += linalg.singular_value_mass(S, g_sq, r) * g_sq
            mass_2r += linalg.singular_value_mass(S, g_sq, 2 * r) * g_sq
            if self.scale == "stable":
                A, B, beta = linalg.stable_scale_factors(A, B, self.stable_gamma)
            else:
                A, B, beta = linalg.rescale_factors(as_out_in(layer, full_weight(base_weight(layer))), A, B)
            betas.append(beta)
            factors[name] = (A, B)
            del G
        stats = {
            # share of ‖G̃‖_F² (summed over modules) in the r / 2r leading singular values
            "sv_mass_top_r": mass_r / total_sq if total_sq > 0 else 0.0,
            "sv_mass_top_2r": mass_2r / total_sq if total_sq > 0 else 0.0,
            # the factor both A and B were multiplied by (β, or ζ under scale=stable)
            "beta": {"min": min(betas), "mean": sum(betas) / len(betas), "max": max(betas)},
        }
        return factors, stats

    def _previous_shape(self) -> tuple[int, int]:
        return self.capture_steps, self.capture_batch_size

    def _previous_indices(self, ctx: StageContext, task: TaskData) -> list[int] | None:
        return None

    def _no_projection_stats(self) -> dict:
        return {"projection": "not applicable: lora_ga uses the current-task gradient only", "fired": False}


class Slice(LoraGA):
    """SLICE: LoRA-GA on ψ(G_cur, G_prev), the current-task gradient reconciled with the
    previous tasks' gradient (pcgrad | gradvac | nullspace | magnitude_preserving, damped by c)."""

    name = "slice"

    def __init__(
        self,
        c: float = 1.0,
        operator: str = "pcgrad",
        scope: str = "global",
        threshold: float = 0.0,
        nullspace_rank: int | None = None,
        capture_steps: int = 8,
        capture_batch_size: int = 16,
        prev_capture_steps: int | None = None,
        prev_capture_batch_size: int | None = None,
        prev_buffer: int | float | None = None,
        svd: str = "randomized",
        niter: int = 4,
        offload: str | bool = "previous",
        capture_max_tokens: int | None = None,
    ):
        super().__init__(capture_steps, capture_batch_size, svd, niter, offload, capture_max_tokens=capture_max_tokens)
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise ConfigError(f"initializer.c={c!r} must be a number in [0, 1]")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ConfigError(f"initializer.threshold={threshold!r} must be a number (a cosine)")
        try:
            linalg.check_projection_args(operator, float(c), scope, float(threshold), nullspace_rank)
        except ValueError as exc:
            raise ConfigError(f"initializer.{exc}") from None
        self.c, self.operator, self.scope = float(c), operator, scope
        self.threshold = float(threshold)
        self.nullspace_rank = None if nullspace_rank is None else int(nullspace_rank)
        self.prev_capture_steps = _positive_int(
            "prev_capture_steps", capture_steps if prev_capture_steps is None else prev_capture_steps
        )
        self.prev_capture_batch_size = _positive_int(
            "prev_capture_batch_size",
            capture_batch_size if prev_capture_batch_size is None else prev_capture_batch_size,
        )
        if prev_buffer is not None:
            try:
                check_buffer_size(prev_buffer)
            except ValueError as exc:
                raise ConfigError(f"initializer.prev_buffer={exc} (or null: the whole training split)") from None
        self.prev_buffer = prev_buffer

    def validate(self, module_shapes: dict[str, tuple[int, int]], rank: int) -> None:
        super().validate(module_shapes, rank)
        if self.nullspace_rank is not None:
            for name, (d_out, d_in) in module_shapes.items():
                if self.nullspace_rank > min(d_out, d_in):
                    raise ConfigError(
                        f"initializer.nullspace_rank={self.nullspace_rank} exceeds min(d_out, d_in)="
                        f"{min(d_out, d_in)} of {name}"
                    )

    def _previous_tasks(self, ctx: StageContext) -> list[TaskData]:
        return list(ctx.previous)

    def _previous_shape(self) -> tuple[int, int]:
        return self.prev_capture_steps, self.prev_capture_batch_size

    def _previous_indices(self, ctx: StageContext, task: TaskData) -> list[int] | None:
        """The examples G_prev is captured on: the task's whole training split (the paper's
        "sample on demand", §3), or its replay buffer, the one regularizer=replay replays."""
        return None if self.prev_buffer is None else ctx.replay_buffer(task, self.prev_buffer)

    def _projection_knobs(self, has_previous: bool) -> dict | None:
        if not has_previous:  # stage 1: exactly LoRA-GA, so the init cache entry is shared too
            return None
        return {
            "operator": self.operator,
            "c": self.c,
            "scope": self.scope,
            "threshold": self.threshold,
            "nullspace_rank": self.nullspace_rank,
        }

    def _no_projection_stats(self) -> dict:
        return {
            "projection": "skipped: no previous task",
            "fired": False,
            "operator": self.operator,
            "c": self.c,
            "scope": self.scope,
            "threshold": self.threshold,
        }


@dataclass
class _CaptureSpec:
    task: str
    steps: int
    batch_size: int
    batches: list
    key: str | None  # content key; None when the cache is off
    source: str = "train split"  # or "replay buffer (k examples)"


class _Captures:
    """Plans (batches + content key) and runs cached gradient captures on one model state."""

    def __init__(
        self, peft_model, layers, ctx: StageContext, cache: TensorCache, offload: str, max_tokens: int | None = None
    ):
        self.model, self.ctx, self.cache, self.offload = peft_model, ctx, cache, offload
        self.max_tokens = max_tokens
        self.weights = {name: base_weight(layer) for name, layer in layers.items()}
        self.transposed = [name for name, layer in layers.items() if layer.fan_in_fan_out]
        base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
        self.model_class = type(base).__name__
        t0 = time.perf_counter()
        self.state = model_state_fingerprint(peft_model) if cache.enabled else None
        self.key_seconds = time.perf_counter() - t0

    def plan(self, task: TaskData, steps: int, batch_size: int, indices: list[int] | None = None) -> _CaptureSpec:
        """Capture batches from task.train, or only from `indices` into it (a replay buffer)."""
        if indices is None:
            batches = list(self.ctx.make_batches(task, steps, batch_size, self.ctx.seed))
        else:
            batches = list(self.ctx.make_batches(task, steps, batch_size, self.ctx.seed, indices=indices))
        key = None
        if self.cache.enabled:
            key = content_key(
                "capture", self.model_class, self.state, sorted(self.weights), batches_fingerprint(batches)
            )
        source = "train split" if indices is None else f"replay buffer ({len(indices)} examples)"
        return _CaptureSpec(task.name, steps, batch_size, batches, key, source)

    def run(self, spec: _CaptureSpec, on_cpu: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
        """One task's capture (from the cache when it holds it); on the CPU if `on_cpu` or
        offload=all."""
        info: dict[str, Any] = {"task": spec.task, "steps": spec.steps, "batch_size": spec.batch_size}
        if spec.source != "train split":  # recorded only when it differs from the default
            info["from"] = spec.source
        t0 = time.perf_counter()
        to_cpu = on_cpu or self.offload == "all"
        if spec.key is not None:
            hit = self.cache.load("capture", spec.key, device="cpu" if to_cpu else self.ctx.device)
            if hit is not None:
                grads, meta = hit
                info.update(cache="hit", loss=meta.get("loss"), seconds=time.perf_counter() - t0)
                return grads, info
        cap = capture_gradients(
            self.model,
            self.weights,
            spec.batches,
            offload=self.offload == "all",
            transposed=self.transposed,
            max_tokens=self.max_tokens,
            dist=self.ctx.dist,
        )
        info.update(
            cache="off" if spec.key is None else "miss",
            loss=cap.loss,
            seconds=cap.seconds,
            forward_passes=cap.info.get("forward_passes"),
        )
        if spec.key is not None:
            self.cache.save("capture", spec.key, cap.grads, {"loss": cap.loss, **info})
        grads = cap.grads
        if to_cpu:  # module by module: never a second full set on the device
            for n in list(grads):
                grads[n] = grads[n].cpu()
        return grads, info

    def run_mean(self, specs: list[_CaptureSpec]) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """Equal-weight mean of one capture per task, holding one capture besides the sum (the
        sum on the CPU unless offload=none)."""
        total: dict[str, torch.Tensor] | None = None
        infos = []
        for spec in specs:
            grads, info = self.run(spec, on_cpu=self.offload != "none")
            infos.append(info)
            if total is None:
                total = grads
            else:
                for n in total:
                    total[n].add_(grads.pop(n))
            del grads
        for n in total:
            total[n].div_(len(specs))
        return total, infos


def _describe(stats: dict) -> str:
    """One line for results.json: did the projection fire, where, and did it change anything."""
    n, k = stats["per_module"]["n"], stats["per_module"]["fired"]
    no_change = "" if stats["changed"] else " (c=0: no change)"
    if stats["operator"] == "nullspace":
        return f"fired: null-space projection in {k}/{n} modules{no_change}"
    if stats["scope"] == "global":
        if not stats["fired"]:
            return f"not fired: global cos {stats['cos_global']:+.4f} >= threshold {stats['threshold']}"
        return "fired" + no_change
    if k == 0:
        return f"not fired: no module with cos < threshold {stats['threshold']}"
    return f"fired in {k}/{n} modules{no_change}"


__all__ = ["LoraGA", "Slice"]

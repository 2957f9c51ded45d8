"""Test-only plug-ins that prove the seams: state that must survive kill -9, history checks.

Importable by `python -m cl_bench` subprocesses when tests/ is on PYTHONPATH. Each plug-in
checks its own state against the run's history and raises StateLost when they disagree, so a
resumed run that did not restore the state fails instead of silently recomputing it.
"""

from __future__ import annotations

import copy

import torch

from cl_bench.mergers.absorb import Absorb
from cl_bench.mergers.base import Merge
from cl_bench.stage import Models, Regularizer


class StateLost(RuntimeError):
    pass


def _b_norm(factors) -> float:
    return float(sum(B.double().pow(2).sum() for _, B in factors.values()) ** 0.5)


class StatefulRegularizer(Regularizer):
    """Adds no gradient: logs `calls` (loss calls this stage, mid-stage state) and keeps per
    finished stage ‖B‖_F of its trained adapter (a tensor) and the stage numbers (JSON)."""

    name = "stateful_test"

    def __init__(self) -> None:
        self.stages: list[int] = []
        self.b_norms = torch.zeros(0, dtype=torch.float64)
        self.calls = 0

    def begin_stage(self, model, ctx) -> None:
        if self.stages != list(range(1, ctx.stage)) or len(ctx.history) != ctx.stage - 1:
            raise StateLost(f"stage {ctx.stage}: regularizer state {self.stages}, history {len(ctx.history)}")
        expected = [_b_norm(r.trained) for r in ctx.history]
        if not torch.allclose(self.b_norms, torch.tensor(expected, dtype=torch.float64), rtol=1e-6):
            raise StateLost(f"stage {ctx.stage}: ‖B‖ {self.b_norms.tolist()} vs history {expected}")
        self.calls = 0

    def loss(self, model, batch, ctx):
        self.calls += 1
        return {"calls": torch.tensor(float(self.calls))}  # a constant: no gradient

    def end_stage(self, model, ctx) -> None:
        from cl_bench.lora.layers import adapter_factors

        self.stages.append(ctx.stage)
        norm = _b_norm(adapter_factors(model, ctx.adapter))
        self.b_norms = torch.cat([self.b_norms, torch.tensor([norm], dtype=torch.float64)])

    def state_dict(self):
        return {"stages": self.stages, "b_norms": self.b_norms, "calls": self.calls}

    def load_state_dict(self, state) -> None:
        self.stages, self.b_norms, self.calls = list(state["stages"]), state["b_norms"], int(state["calls"])


class StatefulMerge(Absorb):
    """Absorb that keeps Σ_i τ_i of one module (a running merged delta) and evaluates a copy of
    the train model: its state must match the history at every consolidate and restore."""

    name = "stateful_absorb_test"

    def __init__(self) -> None:
        self.merged: list[int] = []
        self.delta_sum: torch.Tensor | None = None

    def _check(self, ctx, upto: int) -> None:
        module = sorted(ctx.history[0].trained)[0]
        expected = sum(r.task_vector(module) for r in list(ctx.history)[:upto])
        if self.merged != list(range(1, upto + 1)) or not torch.allclose(self.delta_sum, expected, atol=1e-6):
            raise StateLost(f"stage {ctx.stage}: merge state {self.merged} does not match the history")

    def consolidate(self, model, ctx) -> Models:
        if len(ctx.history) != ctx.stage or ctx.history[-1].task != ctx.current.name:
            raise StateLost(f"stage {ctx.stage}: history holds {[r.task for r in ctx.history]}")
        if self.merged:
            self._check(ctx, ctx.stage - 1)
        module = sorted(ctx.history[-1].trained)[0]
        tau = ctx.history[-1].task_vector(module)
        self.delta_sum = tau if self.delta_sum is None else self.delta_sum + tau
        self.merged.append(ctx.stage)
        plain = super().consolidate(model, ctx).train
        return Models(train=plain, eval=copy.deepcopy(plain))

    def restore(self, model, ctx) -> Models:
        self._check(ctx, ctx.stage)
        return Models(train=model, eval=copy.deepcopy(model))

    def state_dict(self):
        return {"merged": self.merged, "delta_sum": self.delta_sum}

    def load_state_dict(self, state) -> None:
        self.merged, self.delta_sum = list(state["merged"]), state["delta_sum"]


class KeepBranches(Merge):
    """A branch-keeping merge (the GainLoRA shape, without gates): every stage's adapter stays
    in the model, frozen, and all branches are active; nothing is folded into W."""

    name = "keep_branches_test"

    def begin_stage(self, model, ctx) -> None:
        names = [r.adapter for r in ctx.history] + [ctx.adapter]
        model.base_model.set_adapter(names)  # all branches in the forward pass ...
        for n, p in model.named_parameters():  # ... but only this stage's trains
            if "lora_" in n:
                p.requires_grad_(f".{ctx.adapter}." in n)

    def consolidate(self, model, ctx) -> Models:
        from cl_bench.lora.layers import adapter_factors

        for record in ctx.history[:-1]:  # earlier branches are still there, unchanged
            now = adapter_factors(model, record.adapter)
            if any(not torch.equal(now[m][1], record.trained[m][1]) for m in now):
                raise StateLost(f"stage {ctx.stage}: branch {record.adapter} changed")
        model.eval()
        return Models(train=model, eval=model)

    def restore(self, model, ctx) -> Models:
        """Resume: re-attach every stage's branch from the history onto the fresh model."""
        from peft import LoraConfig

        from cl_bench.lora.layers import add_adapter, lora_layers

        config = LoraConfig(
            r=ctx.rank,
            lora_alpha=ctx.alpha,
            target_modules=ctx.target_modules,
            use_rslora=ctx.scaling_convention == "rslora",
        )
        for record in ctx.history:
            model = add_adapter(model, config, record.adapter)
            with torch.no_grad():
                for name, layer in lora_layers(model, record.adapter).items():
                    A, B = record.trained[name]
                    layer.lora_A[record.adapter].weight.copy_(A)
                    layer.lora_B[record.adapter].weight.copy_(B)
                    layer.scaling[record.adapter] = record.scaling[name]
        model.base_model.set_adapter([r.adapter for r in ctx.history], inference_mode=True)
        model.eval()
        return Models(train=model, eval=model)

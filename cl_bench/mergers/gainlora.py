"""GainLoRA — Gated Integration of Low-Rank Adaptation (Liang et al., NeurIPS 2025; survey slides
Eqs. 23–32): every task keeps its own LoRA branch; per-task gates weight the branches; the new
task's gate is initialised and updated under GPM constraints on the gate inputs of earlier tasks,
so that it outputs 0 on them. The LoRA factors themselves train freely (or under a regularizer:
GainLoRA+InfLoRA is regularizer=inflora, GainLoRA+O-LoRA is regularizer=o_lora).

Models (merges/base.py): after stage t the model stays PEFT-wrapped with branches stage_01..stage_t,
all active and frozen, each scaled per example by its gate (cl_bench/lora/gating.py):
    y = W·x + Σ_{i≤t} g_i(prompt)·τ_i·x,    τ_i = s·B_i·A_i − s·B0_i·A0_i (the stage's task vector)
It is the evaluated model and the model stage t+1 starts from (the runner adds branch t+1 beside
the others, lora.add_adapter). W is never changed (but see absorbing initializers below).

Stage t, in the runner's order:
  begin_stage (after the initializer and the regularizer):
    * absorbed init: an absorbing initializer (SLICE, LoRA-GA, PiSSA, ...) set W ← W − s·B0·A0
      so that W + s·B0·A0 is the old function. With kept, GATED branches that identity fails:
      the branch adds back g_t(x)·s·B0·A0, and g_t ≈ 0 on old tasks by construction, so old tasks
      would lose s·B0·A0 from the shared W for good. The absorbed part is therefore moved into
      the branch: W ← W + s·B0·A0 (the one fold, undone) and a frozen companion adapter
      "<adapter>_init" = (A0, −B0) under the same gate. The branch's net term is g_t·τ_t: the
      model starts from the previous function for every input, training starts from (A0, B0) as
      the initializer chose, and the history's task vector τ_t is what the branch adds. A0 is the
      start after any regularizer re-set it (InfLoRA, GPM); W is back to W_prev up to float32 rounding.
    * gate t: G_{t,1}, G_{t,2} ← G_{t−1,1}, G_{t−1,2} (Eq. 26; Kaiming-uniform from the stage seed at
      t = 1); the key per `key_init`, then projected off the key memory M_3 (Eq. 27), so
      G_{t,3}·p_2 = 0 and g_t = f(0) = 0 for every stored old-task p_2 (Eqs. 28–31).
  training: the gate's gradients are projected, ∇G_l ← ∇G_l − ∇G_l·M_l·M_lᵀ (Eq. 32, l = 1..3,
    after_backward), and each optimizer step is pinned, G_l ← G0_l + (G_l − G0_l)·(I − M_l·M_lᵀ)
    (after_step, linalg.pin_update): exact under AdamW, whose per-element 1/√v scaling would
    otherwise leak into span M_l. Why g_t stays 0 on old tasks: M_1 holds old p_0, so G_{t,1}·p_0
    and p_1 do not move; then M_2 holds those p_1, so p_2 does not move; M_3 holds those p_2 and
    the key moves only off M_3: G_{t,3}·p_2 = 0 throughout (up to the energy 1 − ε the memory leaves out).
  end_stage: the gate memory grows with the task's p_0, p_1, p_2 through the trained gate t
    (representations.InputMemory at ε_t = threshold + increment·(t − 1), the authors' code's rule
    and values: `criterion: covariance`, the SVD of the gate inputs' covariance with its squared
    singular values (σ⁴) ranking the directions, first task sum(cumsum < ε); ε = 0.995 raised by
    (1 − 0.995)/15 per task, its ε0 + (1 − ε0)·(t − 1)/15; `criterion: energy` is GPM's σ² rule,
    which keeps more directions at the same ε: on λ_i = 1/i, d = 256, 249 vs 82 at ε = 0.995);
    the mean g_i of every gate on every seen task's training prompts is logged and kept.
  consolidate: gate t frozen and saved; the wrapped model is returned (train = eval).

Saved (state_dict, safetensors): every finished gate's weights, the gate memory, and per branch
its adapter, companion and dropout; the branch factors are the runner's stage files. `restore`
rebuilds every branch, companion and gate on a fresh model (resume after kill -9).

key_init: "inputs" (default; the authors' code): the key is the leading principal direction of
the current task's p_2 (through the initialised G_{t,1}, G_{t,2}) off M_3, at the norm √(d/3)
of the authors' U(−1, 1) key — the new gate starts open on its own task (cos ≈ 1 ⇒ g ≈ 0.96).
"random": the U(−1, 1) draw, projected (Eq. 27 as the slides write it); the gate then starts
nearly closed (cos ≈ d^−½) and the new branch's gradients are scaled down by that g.

Deviations from the authors' T5 code, with reasons:
  * Pooling over the prompt's tokens of a decoder-only model (T5: the encoder input), divided by
    the number of prompt tokens (the code divides by the padded length, so its g depends on the
    batch's padding). See gating.py.
  * After each projected step the code rescales every row of G_1, G_2 and the key back to its
    norm before the projection; for G_1, G_2 that rescale changes G_l·x on stored inputs and breaks
    Eq. 32's invariance, so we do not rescale (the key's rescale is harmless, f uses the cosine).
  * The code projects the optimizer step only; we also project the gradient (GPM's form), so the
    clipping norm and Adam's moments see the constrained gradient.
  * Memory sample: n_samples training examples of the task (default 1000 = all of a SuperNI-15
    task; the code uses every training batch). Gates run without the transformer: collection is cheap.
  * The absorbed-init companion above (the code has no absorbing initializers).
Requires trainer.mask_prompt=true (the prompt is found through its masked labels; one-line error otherwise).

Cost: per branch, every target layer adds one rank-r LoRA product (2·r·(d_in + d_out) MACs per
token, forward; the frozen branches also carry the activation gradient backward) and r·(d_in + d_out)
parameters; an absorbed init doubles that branch. Gates: (2·h·d + d) parameters each and a few
[batch, d] products per forward. Memory: bases of ≤ d, h, d columns. Growth measured in the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..infra.errors import ConfigError
from ..lora import linalg
from ..lora.gating import Gate, GatedBranches, GateInputs
from ..lora.layers import add_frozen_adapter, lora_layers, unwrapped
from ..lora.representations import InputMemory, collect_input_grams
from ..lora.task_vectors import lora_delta
from ..stage import Models, StageContext
from .base import Merge

KEY_INITS = ("inputs", "random")
LAYERS = ("hidden", "output", "key")  # G_1, G_2, G_{L+1}: the gate layers whose inputs the memory keeps
COMPANION = "{}_init"  # the frozen adapter that holds a branch's absorbed init (A0, −B0)


class GainLoRA(Merge):
    name = "gainlora"
    per_row = True  # one gate value per batch row: trainer.layout=pack is refused (stage.Plugin)
    keeps_adapters = True  # every stage's branch stays in the model (stage.Plugin)

    def __init__(
        self,
        hidden_dim: int = 100,
        threshold: float = 0.995,
        threshold_increment: float = 0.005 / 15,
        n_samples: int = 1000,
        batch_size: int = 32,
        key_init: str = "inputs",
        criterion: str = "covariance",
    ):
        where = "merge (gainlora)"
        if key_init not in KEY_INITS:
            raise ConfigError(f"{where}: key_init={key_init!r}; valid: {', '.join(KEY_INITS)}")
        if not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ConfigError(f"{where}: hidden_dim={hidden_dim!r} must be an integer >= 1")
        self.memory = InputMemory(threshold, threshold_increment, n_samples, batch_size, where, criterion)
        self.hidden_dim, self.key_init = int(hidden_dim), key_init
        self.gates: dict[str, dict[str, torch.Tensor]] = {}  # finished stages' gate weights, by adapter
        self.branches: list[dict[str, Any]] = []  # per finished stage: adapter, companion, dropout
        self.gate_means: list[dict[str, Any]] = []  # per finished stage: mean g_i on each seen task
        self._branch: dict[str, Any] = {}
        self._live: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # layer: (W, W0, M)

    # ---------------------------------------------------------------- stage hooks
    def begin_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        bank = GatedBranches.install(model)
        if list(bank.gates) != [r.adapter for r in ctx.history]:
            raise RuntimeError(f"stage {ctx.stage}: gates {list(bank.gates)} do not match the history")
        layers = lora_layers(model, ctx.adapter)
        first = next(iter(layers.values())).lora_dropout[ctx.adapter]
        self._branch = {"adapter": ctx.adapter, "companion": None, "dropout": float(getattr(first, "p", 0.0))}
        if ctx.init_absorbed:  # before the gate: PEFT's add_adapter freezes every non-LoRA parameter
            self._branch["companion"] = self._init_into_branch(model, ctx)
        gate = self._new_gate(model, ctx)
        bank.add_gate(ctx.adapter, gate)
        for adapter in filter(None, (ctx.adapter, self._branch["companion"])):
            bank.attach(model, adapter, ctx.adapter)
        self._live = {}
        for layer in LAYERS:
            M = self.memory.basis(layer)
            if M is not None:
                W = getattr(gate, layer).weight
                self._live[layer] = (W, W.detach().clone(), M.to(W.device))
        ctx.log(
            f"stage {ctx.stage}: gainlora gate {ctx.adapter} (key_init={self.key_init}; constrained layers: "
            f"{', '.join(f'{n} k={m.shape[1]}' for n, (_, _, m) in self._live.items()) or 'none'})"
            + (f"; absorbed init moved into companion {self._branch['companion']}" if self._branch["companion"] else "")
        )

    @torch.no_grad()
    def after_backward(self, model: torch.nn.Module, ctx: StageContext) -> None:
        for W, _, M in self._live.values():  # Eq. 32 on the gradient
            if W.grad is not None:
                W.grad.copy_(linalg.project_off(W.grad, M))

    @torch.no_grad()
    def after_step(self, model: torch.nn.Module, ctx: StageContext) -> None:
        for W, W0, M in self._live.values():  # Eq. 32 on the optimizer's actual step
            W.copy_(linalg.pin_update(W, W0, M))

    def end_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        self._live = {}
        bank = GatedBranches.of(model)
        gate = bank.gates[ctx.adapter]
        embeddings = unwrapped(model).get_input_embeddings()
        self.memory.update(GateInputs(embeddings, gate).eval(), {n: getattr(gate, n) for n in LAYERS}, ctx)
        means = self._gate_means(bank, embeddings, ctx)
        self.gate_means.append({"stage": ctx.stage, "tasks": [t.name for t in ctx.tasks[: ctx.stage]], "mean_g": means})
        ctx.log(
            f"stage {ctx.stage}: gainlora mean g (rows: gates 1..{ctx.stage}, columns: tasks 1..{ctx.stage}) "
            + " | ".join(" ".join(f"{v:.2f}" for v in row) for row in means)
        )

    def consolidate(self, model: torch.nn.Module, ctx: StageContext) -> Models:
        gate = GatedBranches.of(model).gates[ctx.adapter]
        gate.requires_grad_(False)
        self.gates[ctx.adapter] = {k: v.detach().float().cpu().clone() for k, v in gate.state_dict().items()}
        self.branches.append(dict(self._branch))
        model.eval()
        return Models(train=model, eval=model)

    def restore(self, model: torch.nn.Module, ctx: StageContext) -> Models:
        """Re-add every branch (and companion) from the history with this plug-in's gates."""
        from peft import LoraConfig

        if [b["adapter"] for b in self.branches] != [r.adapter for r in ctx.history] or set(self.gates) != {
            r.adapter for r in ctx.history
        }:
            raise RuntimeError(
                f"gainlora state holds {[b['adapter'] for b in self.branches]}, "
                f"the run's history {[r.adapter for r in ctx.history]}"
            )
        for record, branch in zip(ctx.history, self.branches):
            ranks = {m: int(A.shape[0]) for m, (A, _) in record.trained.items()}
            config = LoraConfig(
                r=ctx.rank,
                lora_alpha=ctx.alpha,
                lora_dropout=branch["dropout"],
                target_modules=list(ctx.target_modules),
                task_type="CAUSAL_LM",
                rank_pattern={m: r for m, r in ranks.items() if r != ctx.rank},
            )
            model = add_frozen_adapter(model, config, record.adapter, record.trained, record.scaling)
            if branch["companion"]:
                init = {m: (A0, -B0) for m, (A0, B0) in record.init.items()}
                model = add_frozen_adapter(model, config, branch["companion"], init, record.scaling)
        bank = GatedBranches.install(model)
        embeddings = unwrapped(model).get_input_embeddings()
        for branch in self.branches:
            gate = Gate(embeddings.embedding_dim, self.hidden_dim)
            gate.load_state_dict(self.gates[branch["adapter"]])
            gate.to(embeddings.weight.device).requires_grad_(False)
            bank.add_gate(branch["adapter"], gate)
            for adapter in filter(None, (branch["adapter"], branch["companion"])):
                bank.attach(model, adapter, branch["adapter"])
        model.eval()
        return Models(train=model, eval=model)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.memory.state_dict())
        for adapter, tensors in self.gates.items():
            out.update({f"gate.{adapter}.{k}": v for k, v in tensors.items()})
        out["branches"] = self.branches
        out["gate_means"] = self.gate_means
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.memory.load_state_dict(state)
        self.branches = [dict(b) for b in state.get("branches", [])]
        self.gate_means = list(state.get("gate_means", []))
        self.gates = {}
        for key, value in state.items():
            if key.startswith("gate."):
                adapter, param = key[len("gate.") :].split(".", 1)
                self.gates.setdefault(adapter, {})[param] = value.float()

    # ---------------------------------------------------------------- helpers
    @torch.no_grad()
    def _init_into_branch(self, model: torch.nn.Module, ctx: StageContext) -> str:
        """Undo the absorbed fold (W ← W + s·B0·A0) and hold (A0, −B0) in a frozen companion adapter."""
        from peft import LoraConfig

        companion = COMPANION.format(ctx.adapter)
        layers = lora_layers(model, ctx.adapter)
        init, scaling, ranks = {}, {}, {}
        for name, layer in layers.items():
            A0 = layer.lora_A[ctx.adapter].weight.detach()
            B0 = layer.lora_B[ctx.adapter].weight.detach()
            scaling[name] = float(layer.scaling[ctx.adapter])
            ctx.master.fold_(name, layer, lora_delta(A0, B0, scaling[name]))
            init[name] = (A0.clone(), -B0.clone())
            ranks[name] = int(A0.shape[0])
        config = LoraConfig(
            r=ctx.rank,
            lora_alpha=ctx.alpha,
            lora_dropout=self._branch["dropout"],
            target_modules=list(ctx.target_modules),
            task_type="CAUSAL_LM",
            rank_pattern={m: r for m, r in ranks.items() if r != ctx.rank},
        )
        add_frozen_adapter(model, config, companion, init, scaling)
        return companion

    @torch.no_grad()
    def _new_gate(self, model: torch.nn.Module, ctx: StageContext) -> Gate:
        embeddings = unwrapped(model).get_input_embeddings()
        d = embeddings.embedding_dim
        gate = Gate(d, self.hidden_dim).reset_(torch.Generator().manual_seed(ctx.seed))
        if ctx.history:  # Eq. 26: the previous gate's layers
            previous = self.gates[ctx.history[-1].adapter]
            gate.hidden.weight.copy_(previous["hidden.weight"])
            gate.output.weight.copy_(previous["output.weight"])
        gate.to(embeddings.weight.device)
        M3 = self.memory.basis("key")
        key = gate.key.weight.detach().float()
        if self.key_init == "inputs":
            n = min(self.memory.n_samples, len(ctx.current.train))
            bs = min(self.memory.batch_size, n)
            batches = ctx.make_batches(ctx.current, -(-n // bs), bs, ctx.seed)
            gram = collect_input_grams(GateInputs(embeddings, gate).eval(), {"key": gate.key}, batches).grams["key"]
            key = linalg.principal_rows(gram, M3, 1).to(key.device) * math.sqrt(d / 3.0)
        if M3 is not None:  # Eq. 27
            key = linalg.project_off(key, M3)
        gate.key.weight.copy_(key)
        return gate.requires_grad_(True)

    @torch.no_grad()
    def _gate_means(self, bank: GatedBranches, embeddings: torch.nn.Module, ctx: StageContext) -> list[list[float]]:
        """[gate i][task j] mean g_i over task j's training prompts (the memory's sample), i, j ≤ t."""
        from ..lora.gating import pooled_prompt

        sums = {name: [0.0] * ctx.stage for name in bank.gates}
        for j, task in enumerate(ctx.tasks[: ctx.stage]):
            n = min(self.memory.n_samples, len(task.train))
            bs = min(self.memory.batch_size, n)
            count = 0
            for batch in ctx.make_batches(task, -(-n // bs), bs, ctx.seed):
                values = bank.gate_values(
                    pooled_prompt(embeddings, batch["input_ids"], batch["attention_mask"], batch["labels"])
                )
                for name, g in values.items():
                    sums[name][j] += float(g.sum())
                count += int(batch["input_ids"].shape[0])
            for name in sums:
                sums[name][j] /= max(1, count)
        return [[round(v, 4) for v in row] for row in sums.values()]

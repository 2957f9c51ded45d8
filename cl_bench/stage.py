"""One stage as the plug-ins see it: the context, the history of earlier stages, the plug-in base.

Initializers, regularizers and merges all derive from `Plugin` and receive the same
`StageContext`. Only cl_bench/run/runner.py knows the order of a stage (Runner.train_stage reads
as it); it is, for stage t:

  1. ctx = StageContext(stage=t, ...)                     ctx.history = stages 1..t-1
  2. start the adapter (Runner.start_adapter):
       kwargs = initializer.lora_config_kwargs()
       initializer.before_wrap(model, lora_config, ctx)   # model as the last stage left it
       wrap under ctx.adapter (get_peft_model; add_adapter when the model stayed wrapped: the
       adapters the merge left active stay active, frozen, beside the new one, so the init and
       every begin_stage see the function the last stage ended with, lora.add_adapter)
       result = initializer.init(peft_model, ctx)         # (A0, B0) per module + stats
       every layer's s is set from `lora_scaling` (the one formula), then result.factors are
       copied into the adapter and, if result.absorb, W ← W − s·B0·A0 (lora.apply_init, the
       one fold, through the fp32 master of low-precision weights)
     A stage resumed from an in-stage checkpoint puts back the absorbed init it first started
     from (Runner.checkpointed_init), so that begin_stage rebuilds from it
  3. begin_stage(peft_model, ctx)   initializer, then regularizer, then merge; ctx.init_absorbed
     says whether W absorbed s·B0·A0. A plug-in may re-set the starting A here if it keeps the
     function (lora.replace_start_A_ re-folds an absorbed init); the runner reads the absorbed
     init factors for the history only after begin_stage, so the record is what training started from
  4. train (train/trainer.py); per optimizer step:
       the step's examples = for each of its grad_accum micro-batches, batch_size examples of
       this task + regularizer.extra_examples(ctx, step, micro); trainer.layout lays them out as
       M forward passes (M = grad_accum under layout=pad; train/layouts.py), and for each:
       loss  = LM loss (summed over trained tokens, divided by the trained tokens of the WHOLE
               step) + Σ_k regularizer.loss(model, batch, ctx)[k] / M   (ctx.grad_accum = M here)
       loss.backward()
     then after_backward(model, ctx) of initializer, regularizer, merge   # once, after the
         step's last backward (gradient projection: GPM, GainLoRA's gates)
     then clip, optimizer step, then after_step(model, ctx) of the three (parameter projection:
     GPM's and GainLoRA's exact form under Adam), scheduler step (linear warm-up/decay, train/trainer.lr_factor); the
     in-stage checkpoint (every checkpoint_every_steps) also holds every plug-in's state_dict()
     and every trainable parameter of the model (a merge's gates included)
  5. end_stage(peft_model, ctx)     initializer, then regularizer, then merge
  6. the runner appends stage t to ctx.history (trained factors, absorbed init factors, s) and
     writes them to stages/stage_XX/{adapter,init}.safetensors (run/store.RunStore writes every file)
  7. models = merge.consolidate(peft_model, ctx) -> Models(train=..., eval=...)
  8. every plug-in's state_dict() -> stages/stage_XX/<group>.safetensors (one loop), then the
     train model's target weights (their fp32 master) -> model_state.safetensors
  9. evaluate models.eval on every task; results.json gains row t
Observers (run/observers.py: progress display, W&B, the crash tests' kill points) are told of
each of these moments; they never change the model or the results.
Resume after stage k (even after kill -9): a fresh model gets stage k's model_state, every
plug-in gets load_state_dict(stage k's <group> file), the history is read back from the stage
files, and merge.restore(model, ctx) rebuilds Models. A stage killed mid-way is redone from
step 2 on top of that (its in-stage checkpoint, if any, gives back the init at step 2 and restores
the adapter, optimizer, RNG and the plug-ins' mid-stage state after begin_stage).

Plug-in state: `state_dict()` returns a flat dict whose values are tensors or small JSON values
(int, float, str, bool, None, and lists/dicts of these). Tensors go into the safetensors body,
everything else into its JSON metadata (run/store.save_plugin_state), so one file per group per
stage holds all of it and `load_state_dict` gets back exactly what was returned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from .data.prompts import Batch
from .data.replay import replay_buffer_indices
from .data.tasks.base import TaskData
from .infra.distributed import Dist
from .lora import task_vectors as merges
from .lora.layers import Factors, WeightMaster

PLUGIN_GROUPS = ("initializer", "regularizer", "merge")  # config groups whose plug-ins share Plugin


def stage_seed(seed: int, stage: int) -> int:
    """The seed of stage `stage` (1-based) of a run seeded with `seed`: RNG, data order, SVDs."""
    return int(seed) * 1000 + int(stage)


def adapter_name(stage: int) -> str:
    """The PEFT adapter name of stage `stage`: the one source of adapter names.

    Distinct per stage so that a merge that keeps earlier adapters (branch methods such as
    GainLoRA) can hold them side by side.
    """
    return f"stage_{int(stage):02d}"


class StageRecord:
    """One finished stage, read-only: its trained and absorbed-init factors and per-module s.

    Module names are those of the unwrapped model (`model.layers.0.self_attn.q_proj`). Factors
    are float32 on the CPU, loaded on first use by `load()` (from the run dir's safetensors, so
    a resumed run sees the same history) and then kept.
    """

    def __init__(
        self, stage: int, task: str, adapter: str, load: Callable[[], tuple[Factors, Factors | None, dict[str, float]]]
    ):
        self.stage, self.task, self.adapter = stage, task, adapter
        self._load = load

    @cached_property
    def _content(self) -> tuple[Factors, Factors | None, dict[str, float]]:
        return self._load()

    @property
    def trained(self) -> Factors:
        """(A, B) after training, per module."""
        return self._content[0]

    @property
    def init(self) -> Factors | None:
        """(A0, B0) that were absorbed into W before training (None when nothing was absorbed)."""
        return self._content[1]

    @property
    def scaling(self) -> dict[str, float]:
        """s per module (what the stage trained and folded with)."""
        return self._content[2]

    @property
    def modules(self) -> list[str]:
        return list(self.trained)

    def task_vector(self, module: str) -> torch.Tensor:
        """τ = s·B·A − s·B0·A0 [d_out, d_in] float32: what the stage added to W, net of the
        absorbed init (the model after training is W_before + τ)."""
        A, B = self.trained[module]
        s = self.scaling[module]
        tau = merges.lora_delta(A, B, s)
        if self.init is not None and module in self.init:
            A0, B0 = self.init[module]
            tau = tau - merges.lora_delta(A0, B0, s)
        return tau

    def __repr__(self) -> str:
        return f"StageRecord(stage={self.stage}, task={self.task!r}, adapter={self.adapter!r})"


class History(Sequence[StageRecord]):
    """The finished stages, in order (history[0] is stage 1). Plug-ins only read it."""

    def __init__(self, records: Sequence[StageRecord] = ()):
        self._records = list(records)

    def __getitem__(self, i):
        return self._records[i]

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[StageRecord]:
        return iter(self._records)

    def task_vectors(self, module: str) -> list[torch.Tensor]:
        """[τ_1, ..., τ_k] of one module over the recorded stages (float32, [d_out, d_in])."""
        return [r.task_vector(module) for r in self._records]

    def append(self, record: StageRecord) -> None:
        """Runner only: stage t joins the history after training, before consolidate."""
        if record.stage != len(self._records) + 1:
            raise ValueError(f"history holds stages 1..{len(self._records)}; cannot append stage {record.stage}")
        self._records.append(record)


@dataclass
class StageContext:
    """Everything a plug-in may know about the stage; built by the runner, one per stage."""

    stage: int  # 1-based
    current: TaskData  # the task of this stage
    previous: list[TaskData]  # tasks of stages 1..stage-1, in order
    rank: int
    alpha: float
    scaling: float  # nominal s = lora_scaling(alpha, rank, scaling_convention)
    target_modules: list[str]
    device: torch.device
    seed: int  # stage_seed(run seed, stage)
    # make_batches(task, n_batches, batch_size, seed, indices=None) -> iterator over tokenized
    # training batches drawn only from task.train (any task of the run), on `device`; with
    # `indices` (into task.train, e.g. ctx.replay_buffer(task, size)) only from those examples.
    make_batches: Callable[..., Iterator[Batch]]
    cache_dir: str | None = None  # content-keyed cache of captures / inits; None = off
    log: Callable[[str], None] = print
    tasks: list[TaskData] = field(default_factory=list)  # the whole sequence; [] = previous + [current]
    adapter: str = "default"  # PEFT adapter name of this stage (runner: adapter_name(stage))
    scaling_convention: str = "rslora"
    grad_accum: int = 1  # micro-batches per optimizer step (see Regularizer.loss on normalisation)
    history: History = field(default_factory=History)  # stages 1..t-1; stage t joins before consolidate
    master: WeightMaster | None = None  # lora.WeightMaster of the target weights (the one fold goes through it)
    init_absorbed: bool = False  # W absorbed this stage's s·B0·A0 (set by the runner before begin_stage)
    run_seed: int = 0  # the run's `seed` (ctx.seed is this stage's seed)
    dist: Dist | None = None  # distributed.Dist of the run: rank, world size, collectives (None: one process)

    def __post_init__(self) -> None:
        if not self.tasks:
            self.tasks = [*self.previous, self.current]

    def replay_buffer(self, task: TaskData, size: int | float) -> list[int]:
        """The replay buffer of `task` (indices into task.train): replay_buffer_indices with the
        run seed, so every plug-in asking with the same size gets the same examples."""
        return replay_buffer_indices(task, size, self.run_seed)


@dataclass
class Models:
    """What a merge leaves after stage t: the model stage t+1 trains on (plain or still
    PEFT-wrapped) and the model evaluated after stage t (often the same object)."""

    train: torch.nn.Module
    eval: torch.nn.Module


class Plugin:
    """The shared base of initializers, regularizers and merges: stage hooks and resumable state.

    Hooks receive the PEFT-wrapped model of the stage and its StageContext. The runner calls
    begin_stage after the adapter is initialised (and any init absorbed), before the first
    optimizer step, and end_stage after the last optimizer step, before consolidate; end_stage
    may draw training batches with ctx.make_batches (a Fisher, an input covariance).
    after_backward / after_step run every optimizer step for all three plug-ins (initializer,
    regularizer, merge, in that order): any plug-in may constrain the trainable parameters it
    owns (a regularizer its LoRA factors, a merge the gates it added to the model).
    """

    name = "none"
    # Runs with distributed=fsdp, where every target weight is a DTensor holding a block of rows on
    # each rank (lora/layers.py: change weights only through master.fold_, read one with lora.full_weight).
    # Off unless a plug-in says so; the runner refuses the others at start.
    sharded_weights = False
    # Reads one value per row of a training batch (GainLoRA's gates pool each row's prompt): a row
    # of trainer.layout=pack holds several examples, so the runner refuses that layout at start.
    per_row = False
    # Needs its targets as plain nn.Linear when it runs (PEFT's own data-driven preprocessing: EVA,
    # CorDA, PEFT's LoRA-GA) / keeps earlier stages' adapters in the model (GainLoRA's branches).
    # The runner refuses the pair at start (run/config.check_plugin_pairs): it would fail in stage 2.
    plain_targets = False
    keeps_adapters = False

    def configure(self, plugins: Mapping[str, Plugin]) -> None:
        """Called once by the runner after the initializer, regularizer and merge are all built
        (`plugins`: group -> plug-in), before anything runs: a plug-in may settle a default that
        depends on the others (reading their `name`; plug-ins never import each other) or refuse
        a combination with a one-line ConfigError."""
        return None

    def begin_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        return None

    def end_stage(self, model: torch.nn.Module, ctx: StageContext) -> None:
        return None

    def after_backward(self, model: torch.nn.Module, ctx: StageContext) -> None:
        """Once per optimizer step, after the backward of its last micro-batch, before gradient
        clipping: edit the accumulated gradients (p.grad of trainable parameters) in place."""
        return None

    def after_step(self, model: torch.nn.Module, ctx: StageContext) -> None:
        """Once per optimizer step, right after optimizer.step() and before the in-stage
        checkpoint: edit trainable parameters in place (wrap it in torch.no_grad)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What resume needs: tensors and/or small JSON values (see the module docstring)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


class Regularizer(Plugin):
    """No regularization. Subclasses override the hooks they need."""

    name = "none"
    sharded_weights = True  # the hooks see LoRA factors, activations and data only
    # May re-set the stage's starting A in begin_stage (InfLoRA, GPM's project_init, O-LoRA under an
    # absorbed init): in a composite it begins first, and two such parts cannot compose.
    sets_start_A = False

    def adds_loss_terms(self) -> bool:
        """Whether `loss` may return terms computed on the batch (trainer.layout=pack has no mask for them)."""
        return type(self).loss is not Regularizer.loss

    def loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], ctx: StageContext
    ) -> dict[str, torch.Tensor]:
        """Extra loss terms for this micro-batch, by name; each is logged and added to the loss."""
        return {}

    def extra_examples(self, ctx: StageContext, step: int, micro: int) -> list[tuple[TaskData, int]]:
        """Training examples to add to micro-batch `micro` of optimizer step `step` (0-based), as
        (task, index into task.train) with task one of ctx.tasks: evaluation examples cannot be
        named. Must be a pure function of (state, ctx.seed, step, micro) so a resumed stage
        draws the same examples."""
        return []

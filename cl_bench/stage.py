"""One stage as the plug-ins see it: the context, the history of earlier stages, the plug-in base.

Initializers, regularizers and merges all derive from `Plugin` and receive the same
`StageContext`. Only cl_bench/runner.py knows the order of a stage; it is, for stage t:

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
  3. begin_stage(peft_model, ctx)   initializer, then regularizer, then merge; ctx.init_absorbed
     says whether W absorbed s·B0·A0. A plug-in may re-set the starting A here if it keeps the
     function (lora.replace_start_A_ re-folds an absorbed init); the runner reads the absorbed
     init factors for the history only after begin_stage, so the record is what training started from
  4. train (training.train_stage); per optimizer step:
       the step's examples = for each of its grad_accum micro-batches, batch_size examples of
       this task + regularizer.extra_examples(ctx, step, micro); trainer.layout lays them out as
       M forward passes (M = grad_accum under layout=pad; batching.py), and for each:
       loss  = LM loss (summed over trained tokens, divided by the trained tokens of the WHOLE
               step) + Σ_k regularizer.loss(model, batch, ctx)[k] / M   (ctx.grad_accum = M here)
       loss.backward()
     then after_backward(model, ctx) of initializer, regularizer, merge   # once, after the
         step's last backward (gradient projection: GPM, GainLoRA's gates)
     then clip, optimizer step, then after_step(model, ctx) of the three (parameter projection:
     GPM's and GainLoRA's exact form under Adam), scheduler step (HF's linear warmup/decay); the
     in-stage checkpoint (every checkpoint_every_steps) also holds every plug-in's state_dict()
     and every trainable parameter of the model (a merge's gates included)
  5. end_stage(peft_model, ctx)     initializer, then regularizer, then merge
  6. the runner appends stage t to ctx.history (trained factors, absorbed init factors, s) and
     writes them to stages/stage_XX/{adapter,init}.safetensors
  7. models = merge.consolidate(peft_model, ctx) -> Models(train=..., eval=...)
  8. every plug-in's state_dict() -> stages/stage_XX/<group>.safetensors (one loop), then the
     train model's target weights (their fp32 master) -> model_state.safetensors
  9. evaluate models.eval on every task; results.json gains row t
Resume after stage k (even after kill -9): a fresh model gets stage k's model_state, every
plug-in gets load_state_dict(stage k's <group> file), the history is read back from the stage
files, and merge.restore(model, ctx) rebuilds Models. A stage killed mid-way is redone from
step 3 on top of that (its in-stage checkpoint, if any, restores the adapter, optimizer, RNG and
the plug-ins' mid-stage state after begin_stage).

Plug-in state: `state_dict()` returns a flat dict whose values are tensors or small JSON values
(int, float, str, bool, None, and lists/dicts of these). Tensors go into the safetensors body,
everything else into its JSON metadata (run_dir.save_plugin_state), so one file per group per
stage holds all of it and `load_state_dict` gets back exactly what was returned.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from . import merges
from .tasks.base import TaskData

# A tokenized training batch: input_ids, attention_mask, labels (prompt masked with -100).
Batch = dict[str, torch.Tensor]
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, d_in], B [d_out, r])

SCALINGS = ("rslora", "standard")
PLUGIN_GROUPS = ("initializer", "regularizer", "merge")  # config groups whose plug-ins share Plugin


def lora_scaling(alpha: float, r: int, convention: str) -> float:
    """The LoRA scaling s: α/√r (rsLoRA, Kalajdzievski 2023) or α/r (Hu et al. 2021).

    The one formula for s: the runner sets every adapter layer's `scaling` from it (so training,
    absorption and merging use the same value) and StageContext.scaling is its nominal value.
    Raises ValueError for an unknown convention.
    """
    if convention not in SCALINGS:
        raise ValueError(f"unknown LoRA scaling convention {convention!r}; valid: {', '.join(SCALINGS)}")
    return float(alpha) / (float(r) ** 0.5 if convention == "rslora" else float(r))


def trained_tokens(batch: Batch) -> torch.Tensor:
    """Tokens a causal-LM loss is taken on: labels != -100 after the one-position shift (0-d).

    Summed over every batch of an optimizer step (or of a gradient capture) it is the
    `num_items_in_batch` that makes the loss a mean over tokens whatever the batch split.
    """
    return (batch["labels"][:, 1:] != -100).sum()


def logits_mask(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): keep[b, t] is True where position t predicts a trained token
    (labels[b, t+1] != -100); targets are those tokens, in keep's row-major order. Computed
    where `labels` lives (on the host for training batches: no device sync)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep, labels[:, 1:][keep[:, :-1]]


_LOGITS_TO_KEEP: dict[type, bool] = {}


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    import inspect

    base = model
    while hasattr(base, "get_base_model") or hasattr(base, "_orig_mod") or hasattr(base, "no_sync"):
        # PEFT wrapper, torch.compile wrapper, DistributedDataParallel
        base = base._orig_mod if hasattr(base, "_orig_mod") else base.module if hasattr(base, "no_sync") else base.get_base_model()
    kind = type(base)
    if kind not in _LOGITS_TO_KEEP:
        _LOGITS_TO_KEEP[kind] = "logits_to_keep" in inspect.signature(base.forward).parameters
    return _LOGITS_TO_KEEP[kind]


def causal_lm_loss(model: torch.nn.Module, batch: Batch, n_items, *, keep: torch.Tensor | None = None,
                   targets: torch.Tensor | None = None) -> torch.Tensor:
    """Σ token cross-entropy over the trained tokens of `batch` / n_items (0-d, fp32 logits),
    the loss HF's ForCausalLM computes with `num_items_in_batch=n_items`.

    The LM head and the softmax run only at the positions that predict a trained token
    (transformers' boolean `logits_to_keep`): with the prompt masked that skips most positions,
    and the [tokens, vocab] logits (2 GB in fp32 for 4096 tokens of Llama-3's vocabulary) shrink
    with them. Same numbers up to float rounding. Models whose forward has no `logits_to_keep`
    take HF's own loss. `keep`/`targets` (logits_mask) may be given to avoid recomputing them.
    Batch keys used: input_ids, labels, and attention_mask / position_ids when present.
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_items_in_batch")}
    if not _accepts_logits_to_keep(model):
        return model(**inputs, labels=batch["labels"], num_items_in_batch=n_items, use_cache=False).loss
    if keep is None or targets is None:
        keep, targets = logits_mask(batch["labels"])
    # use_cache=False also lets transformers see packed rows (position_ids restarts, no mask).
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:  # a model that ignores a boolean mask
        return model(**inputs, labels=batch["labels"], num_items_in_batch=n_items, use_cache=False).loss
    targets = targets.to(logits.device)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / n_items


def stage_seed(seed: int, stage: int) -> int:
    """The seed of stage `stage` (1-based) of a run seeded with `seed`: RNG, data order, SVDs."""
    return int(seed) * 1000 + int(stage)


def check_buffer_size(size) -> int | float:
    """A replay-buffer size per task: an int >= 1 (a count of training examples) or a float in
    (0, 1] (a fraction of the task's training split). Returns it; raises ValueError otherwise."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ValueError(f"{size!r} must be a count (an integer >= 1) or a fraction in (0, 1]")
    if isinstance(size, int) and size < 1 or isinstance(size, float) and not 0.0 < size <= 1.0:
        raise ValueError(f"{size!r} must be a count (an integer >= 1) or a fraction in (0, 1]")
    return size


def replay_buffer_indices(task: TaskData, size: int | float, seed: int) -> list[int]:
    """The replay buffer of `task`: sorted indices into task.train (never its eval split).

    `size` is a count (int, capped at the split) or a fraction of the split (float, rounded up,
    at least 1). The examples are the first k of a permutation seeded by (run seed, task name)
    alone, so the buffer of a task is the same at every later stage, after any resume and for
    every plug-in that asks with the same size (replay, SLICE's previous-task capture), and a
    smaller buffer is a subset of a larger one. Raises ValueError for a bad size.
    """
    check_buffer_size(size)
    n = len(task.train)
    k = min(n, size if isinstance(size, int) else max(1, math.ceil(size * n)))
    # str seeding hashes with SHA-512: the same in every process, whatever PYTHONHASHSEED says
    order = random.Random(f"replay-buffer/{int(seed)}/{task.name}").sample(range(n), n)
    return sorted(order[:k])


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

    def __init__(self, stage: int, task: str, adapter: str,
                 load: Callable[[], tuple[Factors, Factors | None, dict[str, float]]]):
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
    master: Any = None  # lora.WeightMaster of the target weights (the one fold goes through it)
    init_absorbed: bool = False  # W absorbed this stage's s·B0·A0 (set by the runner before begin_stage)
    run_seed: int = 0  # the run's `seed` (ctx.seed is this stage's seed)
    dist: Any = None  # distributed.Dist of the run: rank, world size, collectives (None: one process)

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
    # each rank (lora.py: change weights only through master.fold_, read one with lora.full_weight).
    # Off unless a plug-in says so; the runner refuses the others at start.
    sharded_weights = False

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

"""One stage's training loop.

Hand-written rather than HF Trainer because the runner needs, per step, the regularizer's
named loss terms and hooks (stage.py lists them in order), a NaN/inf guard that stops the stage
cleanly, and in-stage checkpoints whose data position and RNG states resume bit-identically
on CPU. `Trainer` holds one stage's optimizer, wrappers and pending log terms; `train_stage`
builds one and runs it.

Gradient accumulation is exact: the LM loss of each forward pass is its summed token loss
divided by the trained tokens of the whole optimizer step (HF's `num_items_in_batch`), so
batch 16 × accum 1 and 8 × 2 and 4 × 4 of the same examples give the same gradient; the
logged "lm" is the per-token mean over the step.

What makes it fast without changing what is trained (each is exact up to float
rounding unless its config doc says otherwise):
* `StepBatcher` builds each step on the host, apart from the step itself: which examples (a pure
  function of the seed and the step, so resume needs only the step) and how they become forward
  passes (train/layouts.py: `trainer.layout` pad | group | pack; group by default).
* The LM head and the loss run only at trained positions (train/loss.causal_lm_loss).
* No host synchronisation per step: loss terms, the gradient norm and the finite flag stay on
  the device and are read every `trainer.log_every_steps` steps, before each checkpoint and at
  the end. The NaN guard still stops the stage cleanly: with the fused AdamW, a non-finite step is
  skipped on the device (the optimizer's `found_inf`, as torch's GradScaler uses it), and so is
  every later step (the flag is sticky), so the adapter keeps the last finite step's weights until
  the next read raises TrainingError naming the first bad step. Without a fused kernel the flag
  is read every step.
* bf16 autocast on CUDA, the model's SDPA attention (models.py), optional `torch.compile` of the
  forward and activation checkpointing (trainer.compile / trainer.gradient_checkpointing).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.prompts import Batch, TrainingEncoder
from ..data.tasks.base import TaskData
from ..infra.distributed import Dist
from ..infra.errors import ConfigError, TrainingError
from ..stage import Plugin, Regularizer, StageContext
from .layouts import Layout
from .loss import causal_lm_loss, logits_mask, trained_tokens

log = logging.getLogger("cl_bench")


@dataclass
class TrainState:
    """Everything a resumed stage needs besides the model's frozen weights."""

    step: int = 0
    losses: list[dict[str, float]] = field(default_factory=list)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def build_optimizer(model, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and a linear warm-up / linear decay schedule over `total_steps` (`lr_factor`).

    `cfg.fused_adamw` (default true): torch's fused kernel where the parameters' device has one
    (CUDA, CPU); else the foreach kernel. The two differ by float rounding only."""
    params = list(trainable_parameters(model).values())
    kwargs = dict(lr=float(cfg.lr), weight_decay=float(cfg.weight_decay), betas=(0.9, 0.999))
    opt = None
    if cfg.get("fused_adamw", True) and params:
        try:
            opt = torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # no fused kernel for this device / dtype
            opt = None
    if opt is None:
        opt = torch.optim.AdamW(params, **kwargs)
    total = max(1, int(cfg.total_steps))
    warmup = warmup_steps(cfg, total)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, warmup, total))


def warmup_steps(cfg, total: int) -> int:
    """ceil(warmup_ratio · total), HF Trainer's count of warm-up steps."""
    return int(math.ceil(float(cfg.warmup_ratio) * total))


def lr_factor(k: int, warmup: int, total: int) -> float:
    """The learning rate of 0-based step k, as a fraction of trainer.lr: (k+1)/(w+1) for the w
    warm-up steps, then linear decay (total−k)/(total−w) (1 at step w, 1/(total−w) at the last).

    Unlike HF's get_linear_schedule_with_warmup (k/w: its first step runs at lr 0 and trains
    nothing, so a one-step stage would end with every B still 0) every step trains; after the
    warm-up the two are the same, and without warm-up identical."""
    if k < warmup:
        return (k + 1) / (warmup + 1)
    return max(0.0, (total - k) / max(1, total - warmup))


def is_fused(opt: torch.optim.Optimizer) -> bool:
    return bool(opt.defaults.get("fused"))


def steps_per_stage(n_examples: int, cfg, tasks: int = 1) -> int:
    """Optimizer steps of a stage: `epochs` passes over `n_examples`, capped at max_steps per
    task (`tasks` > 1: a joint stage over that many tasks, mode=multitask)."""
    per_epoch = math.ceil(n_examples / (int(cfg.batch_size) * int(cfg.grad_accum)))
    steps = per_epoch * int(cfg.epochs)
    if cfg.get("max_steps"):
        steps = min(steps, int(cfg.max_steps) * int(tasks))
    return max(1, steps)


def layout_of(cfg) -> Layout:
    """The trainer config's layouts.Layout (ConfigError on bad values)."""
    name = str(cfg.get("layout", "group"))
    cap, overhead = cfg.get("max_tokens_per_forward"), cfg.get("forward_overhead_tokens", 128)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigError(f"trainer.max_tokens_per_forward={cap!r} is invalid; valid: null or an integer >= 1")
    if isinstance(overhead, bool) or not isinstance(overhead, int) or overhead < 0:
        raise ConfigError(f"trainer.forward_overhead_tokens={overhead!r} is invalid; valid: an integer >= 0")
    try:
        return Layout(name, cap, overhead)
    except ValueError:
        raise ConfigError(f"trainer.layout={name!r} is invalid; valid: pad, group, pack") from None


def check_layout(layout: Layout, plugins: Plugin | Iterable[Plugin]) -> None:
    """Packed rows hold several examples and no attention mask: a regularizer that runs its own
    loss on the batch could not run them, and a plug-in that reads one value per row
    (`Plugin.per_row`: GainLoRA's gates) would mix examples. ConfigError before any work."""
    if layout.name != "pack":
        return
    for plugin in [plugins] if isinstance(plugins, Plugin) else plugins:
        if isinstance(plugin, Regularizer) and plugin.adds_loss_terms():
            raise ConfigError(
                f"trainer.layout=pack cannot be used with regularizer {plugin.name!r}, which adds "
                "loss terms on the batch; use trainer.layout=group (same speed class, padded batches)"
            )
        if plugin.per_row:
            raise ConfigError(
                f"trainer.layout=pack cannot be used with {plugin.name!r}, which reads one value per batch row "
                "(a packed row holds several examples); use trainer.layout=group (same speed class, padded batches)"
            )


@dataclass
class Step:
    """One optimizer step as built on the host."""

    micro_batches: list[Batch]  # the forward passes (CPU tensors)
    n_items: int  # trained tokens of the whole step
    examples: int
    tokens: int  # real (non-pad) tokens
    fed_tokens: int  # tokens the model runs, padding included


class StepBatcher:
    """The examples of every optimizer step and their forward passes.

    `items(step)` (the configured micro-batches: batch_size examples of the task in seeded order
    plus the regularizer's extra examples) is a pure function of (ctx.seed, step), so a resumed
    stage sees the same data and a distributed launcher can shard it; `build(step)` lays them out
    as forward passes (layouts.Layout).
    """

    def __init__(
        self,
        encoder: TrainingEncoder,
        ctx: StageContext,
        regularizer: Regularizer,
        cfg,
        total_steps: int,
        dist: Dist | None = None,
    ):
        self.encoder, self.ctx, self.regularizer = encoder, ctx, regularizer
        self.dist = dist or Dist()
        self.bs, self.accum = int(cfg.batch_size), int(cfg.grad_accum)
        self.layout = layout_of(cfg)
        task = ctx.current
        # The whole example order is a pure function of the seed: resuming at step k needs only k.
        self.order = encoder.order(
            task, ctx.seed, epochs=math.ceil(total_steps * self.bs * self.accum / len(task.train)) + 1
        )

    def items(self, step: int) -> list[list[tuple[TaskData, int]]]:
        out = []
        for micro in range(self.accum):
            pos = (step * self.accum + micro) * self.bs
            items = [(self.ctx.current, i) for i in self.order[pos : pos + self.bs]]
            items += _checked_extra(self.regularizer.extra_examples(self.ctx, step, micro), self.ctx)
            out.append(items)
        return out

    def build(self, step: int) -> Step:
        """This rank's forward passes of `step`. Under data parallelism the step's examples are
        dealt round-robin to the ranks and this rank's share is cut into at most grad_accum
        configured micro-batches; `n_items` is then this rank's trained tokens (the trainer
        all-reduces it)."""
        configured = [[self.encoder.encode_task(t)[i] for t, i in items] for items in self.items(step)]
        if self.dist.world > 1:
            mine = self.dist.shard([e for m in configured for e in m])
            k = min(self.accum, len(mine))
            configured = [mine[j * len(mine) // k : (j + 1) * len(mine) // k] for j in range(k)]
        micro = self.layout.micro_batches(
            configured, self.encoder.pad_id, batch_size=self.bs, max_len=self.encoder.max_len
        )
        return Step(
            micro_batches=micro,
            n_items=sum(int(trained_tokens(b)) for b in micro),
            examples=sum(len(m) for m in configured),
            tokens=sum(len(e.input_ids) for m in configured for e in m),
            fed_tokens=sum(int(b["input_ids"].numel()) for b in micro),
        )


def _forward_backward(
    model: torch.nn.Module,
    micro_batches: Sequence[Batch],
    n_items: int | torch.Tensor,
    regularizer: Regularizer,
    ctx: StageContext,
    *,
    autocast: bool,
    where: str,
    forward: Callable | None = None,
    plugins: Sequence[Plugin] | None = None,
    wrapped: torch.nn.Module | None = None,
    world: int = 1,
    idle: int = 0,
    average: Callable[[], None] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Forward and backward of one step's micro-batches, then the after_backward hook of every
    plug-in in `plugins` (default: the regularizer alone), in order.
    Returns the step's logged terms and an all-finite flag, all 0-d tensors on the device (no
    host synchronisation).

    Data parallel: `wrapped` is the DDP module (its all-reduce runs in the last backward only),
    `n_items` the whole step's trained tokens over all ranks, and the LM loss is multiplied by
    `world` for the backward because DDP averages the ranks' gradients; the logged terms stay
    this rank's share (the trainer sums them over ranks when it reads them).
    Sharded base (distributed=fsdp): `idle` more forward/backward passes that count for nothing (the
    last micro-batch again, its loss times 0) keep this rank in step with the busiest one, and
    `average` (the LoRA gradients' mean over the ranks) runs before the after_backward hooks."""
    accum = len(micro_batches)
    device = next(model.parameters()).device
    forward = model if forward is None else forward
    # Regularizers normalise by the forward passes of the step (regularizers/base.py); a layout
    # may run more or fewer than trainer.grad_accum of them.
    rctx = ctx if ctx.grad_accum == accum else dataclasses.replace(ctx, grad_accum=accum)
    logged: dict[str, torch.Tensor] = {}
    finite = torch.ones((), dtype=torch.bool, device=device)
    for i, micro in enumerate(micro_batches):
        sync = Dist.no_sync(wrapped, i == accum - 1)
        lm, extra, ok = _micro_backward(
            model, forward, micro, n_items, regularizer, rctx, device, sync, autocast=autocast, world=world, where=where
        )
        finite = finite & ok
        logged["lm"] = logged.get("lm", 0.0) + lm.detach()
        for k, v in extra.items():
            v = torch.as_tensor(v).detach().to(device)
            logged[k] = logged.get(k, 0.0) + v / accum
    if idle:
        _idle_passes(forward, micro_batches[-1], n_items, idle, device, autocast=autocast)
    if average is not None:
        average()
    for plugin in (regularizer,) if plugins is None else plugins:
        plugin.after_backward(model, ctx)
    return logged, finite


def _micro_backward(
    model,
    forward,
    micro: Batch,
    n_items,
    regularizer: Regularizer,
    rctx: StageContext,
    device: torch.device,
    sync,
    *,
    autocast: bool,
    world: int,
    where: str,
):
    """Forward and backward of one micro-batch: (LM loss, regularizer terms, finite flag), on the
    device. TrainingError naming the knobs on out of memory."""
    accum = rctx.grad_accum
    keep, targets = logits_mask(micro["labels"])  # on the host, before the copy: no sync
    batch = {k: v.to(device, non_blocking=True) for k, v in micro.items()}
    batch["num_items_in_batch"] = n_items
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), sync:
            lm = causal_lm_loss(forward, batch, n_items, keep=keep, targets=targets.to(device, non_blocking=True))
            extra = regularizer.loss(model, batch, rctx)
            lm_part = lm * world if world > 1 else lm
            loss = lm_part + sum(v / accum for v in extra.values()) if extra else lm_part
            finite = torch.isfinite(loss.detach())
            loss.backward()
    except torch.OutOfMemoryError:
        raise TrainingError(
            f"out of memory at {where} (micro-batch {micro['input_ids'].shape[0]} x "
            f"{micro['input_ids'].shape[1]} tokens); lower trainer.max_tokens_per_forward or trainer.batch_size "
            "(raise trainer.grad_accum to keep the effective batch), or trainer.max_len"
        ) from None
    return lm, extra, finite


def _idle_passes(forward, micro: Batch, n_items, idle: int, device: torch.device, *, autocast: bool) -> None:
    """`idle` forward/backward passes of `micro` whose loss counts for nothing (times 0): a sharded
    rank with a short share runs as many collective passes as the busiest rank."""
    keep, targets = logits_mask(micro["labels"])
    batch = {k: v.to(device, non_blocking=True) for k, v in micro.items()}
    for _ in range(idle):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            lm = causal_lm_loss(forward, batch, n_items, keep=keep, targets=targets.to(device))
        (lm * 0.0).backward()


def step_gradients(
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    regularizer: Regularizer,
    ctx: StageContext,
    *,
    autocast: bool = False,
    where: str = "",
    plugins: Sequence[Plugin] | None = None,
) -> dict[str, float]:
    """Forward and backward of one optimizer step over its micro-batches, then the after_backward
    hook of every plug-in in `plugins` (default: the regularizer alone), in order. Leaves the
    step's gradient in .grad; returns the logged terms.

    The LM loss is normalised by the trained tokens of all micro-batches together; regularizer
    terms are averaged over the micro-batches (regularizers/base.py states the rule).
    Raises TrainingError on a non-finite loss or out of memory. (Synchronous: reads the terms.)
    """
    n_items = sum(int(trained_tokens(b)) for b in micro_batches)
    terms, finite = _forward_backward(
        model, micro_batches, n_items, regularizer, ctx, autocast=autocast, where=where, plugins=plugins
    )
    values = {k: float(v) for k, v in terms.items()}
    if not bool(finite):
        raise TrainingError(f"non-finite loss at {where}: {values}; lower trainer.lr or check the regularizer")
    return values


class Trainer:
    """One stage's optimizer loop: the trainable parameters (LoRA factors, and whatever a plug-in
    added, e.g. gates) trained on ctx.current.

    Construction builds what the whole stage uses: AdamW and its schedule (`optimizer_state`: a
    checkpoint's {"optimizer", "scheduler"} state dicts to continue from), the step batcher, the
    DDP wrapper (data parallel), the compiled forward (trainer.compile) and the activation
    checkpointing context (trainer.gradient_checkpointing); ConfigError on a bad layout or
    checkpointing choice. `plugins` get after_backward / after_step every step, in order
    (default: the regularizer alone); the regularizer also gives the loss terms and extra examples.

    `run` trains from a TrainState to cfg.total_steps, once per Trainer; `step` is one optimizer
    step. Each step's terms stay on the device until the next drain (every log_every_steps steps,
    before a checkpoint, at the end): one host sync, and under data parallelism one all-reduce.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        ctx: StageContext,
        encoder: TrainingEncoder,
        cfg: Any,
        regularizer: Regularizer,
        *,
        optimizer_state: dict | None = None,
        plugins: Sequence[Plugin] | None = None,
    ):
        self.model, self.ctx, self.cfg, self.regularizer = model, ctx, cfg, regularizer
        self.task, self.device = ctx.current, ctx.device
        self.opt, self.sched = build_optimizer(model, cfg)
        warmup = warmup_steps(cfg, max(1, int(cfg.total_steps)))
        if warmup and warmup >= int(cfg.total_steps):
            log.warning(
                "stage %d (%s): all %d steps are warm-up (trainer.warmup_ratio=%s): the learning rate peaks at "
                "%.3g of trainer.lr; lower trainer.warmup_ratio or train more steps",
                ctx.stage,
                ctx.current.name,
                int(cfg.total_steps),
                cfg.warmup_ratio,
                lr_factor(warmup - 1, warmup, warmup),
            )
        if optimizer_state is not None:
            self.opt.load_state_dict(optimizer_state["optimizer"])
            self.sched.load_state_dict(optimizer_state["scheduler"])
        self.total = int(cfg.total_steps)
        self.dist = ctx.dist or Dist()
        self.batcher = StepBatcher(encoder, ctx, regularizer, cfg, self.total, self.dist)
        self.plugins = (regularizer,) if plugins is None else tuple(plugins)
        check_layout(self.batcher.layout, self.plugins)
        self.params = list(trainable_parameters(model).values())
        self.autocast = (
            self.device.type == "cuda" and bool(cfg.get("autocast_bf16", True)) and torch.cuda.is_bf16_supported()
        )
        self.checkpoint_every = int(cfg.get("checkpoint_every_steps") or 0)
        self.log_every = max(1, int(cfg.get("log_every_steps") or 1))
        self.deferred = is_fused(self.opt)  # the device skips a bad step itself; read the flag at log points only
        self.bad = torch.zeros((), device=self.device)  # sticky: 1 once any step was non-finite
        self.wrapped = self.dist.wrap(model)  # DDP under data parallelism, else None
        # fsdp: the LoRA factors are whole on every rank, their gradients averaged after backward
        self.averages = self.dist.sharded and self.dist.world > 1
        self.forward = self.wrapped
        if cfg.get("compile", False):
            self.forward = torch.compile(self.wrapped or model, dynamic=True)
        self.checkpointing = _activation_checkpointing(model, bool(cfg.get("gradient_checkpointing", False)))
        self.pending: list[tuple[int, dict[str, torch.Tensor], torch.Tensor, torch.Tensor, float]] = []
        self.counts = {"examples": 0, "tokens": 0, "fed_tokens": 0, "trained_tokens": 0, "forward_passes": 0}
        self.on_step: Callable[[int, dict[str, float]], None] | None = None
        self.bar: Any = None
        self.ran = False

    def run(
        self,
        state: TrainState | None = None,
        *,
        checkpoint: Callable[[TrainState, torch.optim.Optimizer, Any], None] | None = None,
        progress: bool = True,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
    ) -> dict[str, Any]:
        """Steps from state.step (0: a fresh stage) to cfg.total_steps; returns the stage's summary
        for results.json. `checkpoint(state, optimizer, scheduler)` runs every checkpoint_every_steps
        steps (not after the last), after that step's terms were read; `on_step(step, terms)` for
        every step, in order, when its terms are read. TrainingError at the first non-finite step
        (no checkpoint after it) or on out of memory."""
        if self.ran:
            raise RuntimeError("a Trainer runs its stage once; build a new one")
        self.ran, self.on_step = True, on_step
        state = state or TrainState()
        self.model.train()
        start = time.time()
        self.bar = tqdm(
            total=self.total, initial=state.step, desc=f"train {self.task.name}", leave=False, disable=not progress
        )
        try:
            with self.checkpointing:
                while state.step < self.total:
                    self.step(state)
                    self._log_point(state, checkpoint)
        finally:
            if self.deferred:
                self.opt.found_inf = None
            self.bar.close()
        self.model.eval()
        self.wrapped = self.forward = None  # the DDP buckets / compiled graph: not needed after the stage
        return self._summary(state, time.time() - start)

    def step(self, state: TrainState) -> None:
        """Optimizer step state.step + 1: forward/backward of its passes, clipping, the plug-ins'
        hooks, the update (skipped on the device once any step was non-finite, with the fused
        AdamW) and the schedule; advances state.step. Its terms wait in `pending`."""
        built = self.batcher.build(state.step)
        where = f"task {self.task.name!r} step {state.step + 1} (trainer.lr={self.cfg.lr})"
        n_items = self.dist.step_token_count(built.n_items, self.device, f"counting the trained tokens of {where}")
        idle = self.dist.padding_passes(len(built.micro_batches), f"counting the passes of {where}")
        terms, finite = _forward_backward(
            self.model,
            built.micro_batches,
            n_items,
            self.regularizer,
            self.ctx,
            autocast=self.autocast,
            where=where,
            forward=self.forward,
            wrapped=self.wrapped,
            world=self.dist.world,
            plugins=self.plugins,
            idle=idle,
            average=self._average if self.averages else None,
        )
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, float(self.cfg.max_grad_norm)
        )  # of the all-reduced gradient
        finite = self.dist.all_finite(finite & torch.isfinite(grad_norm), f"the finite check of {where}")
        lr = self.sched.get_last_lr()[0]  # the rate this step uses
        if self.deferred:
            self.bad = torch.maximum(self.bad, (~finite).float())
            self.opt.found_inf = self.bad  # fused AdamW skips the update (params, moments, step count)
        elif not bool(finite):
            self.pending.append((state.step + 1, terms, grad_norm, finite, lr))
            self._drain(state)  # raises
        self.opt.step()
        # after a skipped (non-finite) step too: its projection of unchanged parameters is a
        # no-op up to rounding, and the stage stops at the next read before any checkpoint
        for plugin in self.plugins:
            plugin.after_step(self.model, self.ctx)
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        state.step += 1
        for k, v in (
            ("examples", built.examples),
            ("tokens", built.tokens),
            ("fed_tokens", built.fed_tokens),
            ("trained_tokens", built.n_items),
            ("forward_passes", len(built.micro_batches)),
        ):
            self.counts[k] += v
        self.pending.append((state.step, terms, grad_norm, finite, lr))

    def _average(self) -> None:
        self.dist.average_gradients_(self.params, f"averaging the gradients of task {self.task.name!r}")

    def _log_point(self, state: TrainState, checkpoint: Callable | None) -> None:
        """After a step: drain at log points, checkpoint when due (after the drain, which raises on
        a non-finite step first), then report the drained steps."""
        every = self.checkpoint_every
        due = bool(checkpoint is not None and every and state.step % every == 0 and state.step < self.total)
        if due or state.step % self.log_every == 0 or state.step == self.total:
            done = self._drain(state)  # the only host sync of a step
            if due:
                checkpoint(state, self.opt, self.sched)
            self._report(done)

    def _read_pending(self) -> list[tuple[int, dict[str, float], bool]]:
        """[(step, {terms, grad_norm, lr}, finite)] for every pending step, oldest first; empties
        `pending`. Under data parallelism "lm" is the sum of the ranks' shares, the others
        (regularizer terms, the identical grad norm, the finite flags) the ranks' mean."""
        if not self.pending:
            return []
        stacked = torch.stack(
            [t.float() for _, terms, gn, ok, _ in self.pending for t in (*terms.values(), gn.detach(), ok)]
        )
        mean = [k != "lm" for _, terms, _, _, _ in self.pending for k in (*terms, "gn", "ok")]
        flat = self.dist.sum_or_mean(stacked, mean, "reading the loss terms").tolist()
        out, at = [], 0
        for step, terms, _, _, lr in self.pending:
            vals = flat[at : at + len(terms) + 2]
            at += len(terms) + 2
            row = dict(zip(terms, vals[:-2]))
            row.update(grad_norm=vals[-2], lr=lr)
            out.append((step, row, vals[-1] == 1.0 and math.isfinite(vals[-2])))
        self.pending = []
        return out

    def _drain(self, state: TrainState) -> list[tuple[int, dict[str, float]]]:
        """The pending steps' terms into state.losses; returns them for `_report`. TrainingError at
        the first non-finite step (after reporting the finite ones before it)."""
        done = []
        for step, row, ok in self._read_pending():
            if not ok:
                self._report(done)
                shown = {k: v for k, v in row.items() if k != "lr"}
                terms_ok = all(math.isfinite(v) for k, v in shown.items() if k != "grad_norm")
                what = "gradient norm" if terms_ok else "loss"
                raise TrainingError(
                    f"non-finite {what} at task {self.task.name!r} step {step} (trainer.lr={self.cfg.lr}): "
                    f"{shown}; lower trainer.lr or check the regularizer"
                )
            state.losses.append(row)
            done.append((step, row))
        return done

    def _report(self, done: list[tuple[int, dict[str, float]]]) -> None:
        # after the step's checkpoint: a callback that stops the process finds it written
        for step, row in done:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k not in ("grad_norm", "lr")})
            if self.on_step is not None:
                self.on_step(step, row)

    def _summary(self, state: TrainState, seconds: float) -> dict[str, Any]:
        counts = self.dist.summed_counts(self.counts, "summing the throughput counts")  # what all ranks ran together
        first = state.losses[0] if state.losses else {}
        last = state.losses[-1] if state.losses else {}
        return {
            "steps": self.total,
            "examples": len(self.task.train),
            "loss_first": first,
            "loss_last": last,
            "loss_curve": [round(x["lm"], 5) for x in state.losses],
            "seconds": seconds,
            # what this process ran (a resumed stage counts only its own steps)
            "throughput": {
                **counts,
                "layout": self.batcher.layout.name,
                "tokens_per_s": counts["tokens"] / seconds if seconds > 0 else None,
            },
        }


def train_stage(
    model: torch.nn.Module,
    ctx: StageContext,
    encoder: TrainingEncoder,
    cfg: Any,
    regularizer: Regularizer,
    *,
    state: TrainState | None = None,
    optimizer_state: dict | None = None,
    checkpoint: Callable[[TrainState, torch.optim.Optimizer, Any], None] | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    plugins: Sequence[Plugin] | None = None,
) -> dict[str, Any]:
    """Train the trainable parameters (LoRA factors, and whatever a plug-in added, e.g. gates) on
    ctx.current; returns a summary for results.json. `plugins` get after_backward / after_step
    every step, in order (the runner passes initializer, regularizer, merge; default: the
    regularizer alone); the regularizer also gives the loss terms and extra examples.

    `cfg` needs lr, weight_decay, warmup_ratio, epochs, batch_size, grad_accum, max_grad_norm,
    total_steps (filled by the runner), checkpoint_every_steps; optional: autocast_bf16 (bf16 on
    CUDA), layout, max_tokens_per_forward, forward_overhead_tokens, log_every_steps, fused_adamw,
    compile, gradient_checkpointing (conf/trainer/default.yaml documents each).
    `on_step(step, terms)` is called for every step, in order, when its terms are read (every
    log_every_steps steps, before a checkpoint, at the end). A `Trainer` built and run once.
    """
    trainer = Trainer(model, ctx, encoder, cfg, regularizer, optimizer_state=optimizer_state, plugins=plugins)
    return trainer.run(state or TrainState(), checkpoint=checkpoint, progress=progress, on_step=on_step)


class _activation_checkpointing:
    """Context: HF activation checkpointing (non-reentrant) on the unwrapped model while training."""

    def __init__(self, model: torch.nn.Module, enabled: bool):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.base = base if enabled else None
        if enabled and not getattr(base, "supports_gradient_checkpointing", False):
            raise ConfigError(f"trainer.gradient_checkpointing=true but {type(base).__name__} does not support it")

    def __enter__(self):
        if self.base is not None:
            if hasattr(self.base, "activation_checkpointing_enable"):  # transformers >= 5.x naming
                self.base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return self

    def __exit__(self, *exc):
        if self.base is not None:
            (getattr(self.base, "activation_checkpointing_disable", None) or self.base.gradient_checkpointing_disable)()
        return False


def _checked_extra(items: list[tuple[TaskData, int]], ctx: StageContext) -> list[tuple[TaskData, int]]:
    """Extra examples must be training examples of this run's tasks (never evaluation ones)."""
    for task, i in items:
        if not any(task is t for t in ctx.tasks) or not 0 <= int(i) < len(task.train):
            raise ValueError(
                f"extra_examples returned ({getattr(task, 'name', task)!r}, {i}): "
                "not a training example of this run's tasks"
            )
    return items

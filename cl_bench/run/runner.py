"""The stage loop: the only place that knows the order of a stage.

A stage is start_adapter → restore a checkpointed init → begin_stage hooks → train → end_stage
hooks → history and consolidate → save → evaluate (`Runner.train_stage`, then `run_stage`);
cl_bench/stage.py lists every hook in that order and says who may do what. What watches the run
(progress display, W&B, the crash tests' kill points, cost meters) are observers called at named
moments (run/observers.py); every file of the run dir is read and written by run/store.RunStore.
`mode` (run/modes.py) decides the stages: one per task on the last stage's model (sequential),
one joint stage on all tasks (multitask), or one per task from the base weights (independent).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ..data.models import load_model, model_unavailable, resolve_device, resolve_model_path
from ..data.prompts import TrainingEncoder, prompt_format, prompt_truncation
from ..data.tasks import data_fingerprint, evaluation_record, load_sequence, split_stats
from ..evaluation.baselines import baselines
from ..evaluation.metrics import compute_mode_metrics
from ..evaluation.seen import eval_token_budget, evaluate_task
from ..infra.console import Progress
from ..infra.distributed import Dist
from ..infra.errors import CLBenchError, ConfigError
from ..infra.files import SCHEMA, package_versions, provenance
from ..infra.interrupt import Interrupted, InterruptGuard
from ..infra.jobs import Job, cpu_threads, job_scope
from ..lora.layers import (
    WeightMaster,
    adapter_factors,
    add_adapter,
    apply_init,
    follow_peft_absorption_,
    lora_layers,
    lora_scaling,
    set_scaling,
    target_linears,
    validate_rank,
)
from ..regularizers.composite import normalize_config as normalize_regularizers
from ..stage import PLUGIN_GROUPS, History, Models, StageContext, StageRecord, adapter_name, stage_seed
from ..train.trainer import check_layout, layout_of, steps_per_stage, train_stage
from . import config as config_checks
from . import modes
from .observers import KillPoints, Observer, Observers, ProgressObserver, TrackerObserver
from .store import RunStore
from .summary import format_summary, truncation_lines
from .sync import share_init_factors, share_started_adapter

log = logging.getLogger("cl_bench")


def build_plugins(cfg) -> dict[str, Any]:
    """Instantiate initializer, regularizer and merge from their `_target_` (validates kwargs), then
    let each see the others (Plugin.configure)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    normalize_regularizers(cfg)  # regularizer=[a,b]: one Composite node (regularizers/composite.py)
    plugins = {}
    for group in PLUGIN_GROUPS:
        try:
            plugins[group] = instantiate(cfg[group])
        except InstantiationException as exc:
            # Hydra wraps the plug-in's own one-line ConfigError; surface that, not the wrapper.
            if isinstance(exc.__cause__, CLBenchError):
                raise exc.__cause__ from None
            raise ConfigError(
                f"{group}: cannot build {cfg[group].get('_target_')!r}: {str(exc).splitlines()[-1]}"
            ) from None
    for plugin in plugins.values():  # defaults that depend on the other groups; impossible combinations
        plugin.configure(plugins)
    return plugins


@contextlib.contextmanager
def timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    """seconds[key] = wall-clock seconds the block took (set when it ends without an exception)."""
    start = time.time()
    yield
    seconds[key] = time.time() - start


class Runner:
    """One run: `run()` prepares, loads the model, then runs the stages of `mode`, resuming from
    whatever the run dir holds. `observers`: extra Observers, called after the progress display
    and W&B, before the kill points."""

    def __init__(self, cfg, run_dir: Path, job: Job | None = None, observers: Sequence[Observer] = ()):
        normalize_regularizers(cfg)  # before the config is recorded: regularizer=[a,b] as one Composite node
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.job = job or Job()  # preemption safe points and exit hooks (infra/jobs.py)
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.dist = Dist()  # one process until prepare() reads the `distributed` group
        self.store = RunStore(self.run_dir, self.dist)
        self.extra_observers = list(observers)

    # ---- setup -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything that can fail on bad input, before the model is loaded."""
        cfg = self.cfg
        config_checks.validate(cfg)
        self.dist = Dist.from_config(cfg.get("distributed"))  # rank logic: infra/distributed.py
        self.store = RunStore(self.run_dir, self.dist)
        self.device = self.dist.device(resolve_device(str(cfg.device)))
        self.dist.check_step_size(int(cfg.trainer.batch_size) * int(cfg.trainer.grad_accum))
        threads, why = cpu_threads(cfg.get("threads"))
        torch.set_num_threads(threads)
        log.info("torch CPU threads: %d (%s)", threads, why)
        self.tasks = load_sequence(cfg.sequence, cfg.data.get("root"), int(cfg.seed))
        for task in self.tasks:  # e.g. an empty test file: evaluated on held-out training examples instead
            if task.info.get("notice"):
                log.warning("task %s: %s", task.name, task.info["notice"])
        self.plugins = build_plugins(cfg)
        self.initializer, self.regularizer, self.merger = (self.plugins[g] for g in PLUGIN_GROUPS)
        config_checks.check_plugin_pairs(self.plugins)  # e.g. PEFT's EVA beside GainLoRA's kept adapters
        self.dist.check_plugins(self.plugins, cfg)  # distributed=fsdp: the plug-ins that work on sharded weights
        # sequential | multitask (one joint stage) | independent (each stage from the base model): modes.py
        self.mode = modes.check_mode(cfg.get("mode", "sequential"))
        modes.check_plugins(self.mode, self.initializer, self.regularizer, self.merger, cfg.initializer)
        self.stage_tasks = modes.stage_tasks(self.mode, self.tasks)
        check_layout(layout_of(cfg.trainer), self.plugins.values())  # pack: not with per-row plug-ins
        self.general_eval = None  # lm-eval is imported only when general capability is measured
        if str(cfg.general_eval.get("when", "none")) != "none":
            from ..evaluation import general as general_eval

            general_eval.parse_config(cfg.general_eval)  # one-line ConfigError on bad values
            general_eval.check_data(cfg.general_eval, cfg.data.get("root"))  # before the model loads
            self.general_eval = general_eval
        cache_dir = str(cfg.cache.dir) if cfg.cache.enabled else None
        self.model_path = resolve_model_path(cfg.model, str(cfg.cache.dir), log=log.info)
        try:
            shapes = config_checks.module_shapes(
                self.model_path, list(cfg.lora.target_modules), bool(cfg.model.get("trust_remote_code", False))
            )
        except (OSError, ValueError):
            raise model_unavailable(self.model_path) from None
        validate_rank(shapes, int(cfg.lora.r), list(cfg.lora.target_modules))
        self.initializer.validate(shapes, int(cfg.lora.r))
        self.init_cache_dir = str(Path(cache_dir) / "inits") if cache_dir else None

    def new_results(self) -> dict[str, Any]:
        T = len(self.tasks)
        return {
            "schema": SCHEMA,
            "sequence": str(self.cfg.sequence.name),
            "tasks": [t.name for t in self.tasks],
            "mode": self.mode,
            "matrix": [[None] * T for _ in range(len(self.stage_tasks) + 1)],
            "metrics": {},
            "general": {},
            "stages": [],
            "eval_sizes": [len(t.eval[: self.cfg.evaluation.limit or None]) for t in self.tasks],
            "split_stats": split_stats(self.tasks),
            # what was trained and evaluated on, by content: a resume from another data.root compares it
            "data": {"root": self.config.get("data", {}).get("root"), "fingerprint": data_fingerprint(self.tasks)},
            "evaluation": evaluation_record(self.tasks, str(self.cfg.evaluation.protocol)),
            "config": self.config,
            "versions": package_versions(),
            "complete": False,
            "status": "running",
            "baselines": baselines(self.tasks, self.cfg.evaluation.limit),
            "provenance": provenance(self.device),
        }

    def load_model(self) -> torch.nn.Module:
        """The model (fsdp: sharded), tokenizer, encoder and fp32 master; the models of stage 0."""
        cfg, sharded = self.cfg, self.dist.sharded  # fsdp: rank 0 alone reads the weights, on the CPU
        model, self.tokenizer = load_model(
            cfg.model,
            self.device,
            str(cfg.cache.dir),
            log=log.info,
            place=not sharded,
            weights=not sharded or self.dist.is_main,
        )
        model = self.dist.shard_model(model, log=log.info)  # distributed=fsdp; before the master copies any weight
        tr, ev = cfg.trainer, cfg.evaluation
        # Never feed more positions than the model has (the tiny model has 512).
        max_pos = getattr(model.config, "max_position_embeddings", None) or 10**9
        self.max_prompt_len = min(int(ev.max_prompt_len), max_pos - int(ev.max_new_tokens))
        self.encoder = TrainingEncoder(
            self.tokenizer, min(int(tr.max_len), max_pos), bool(tr.mask_prompt), prompt_format(ev)
        )
        # what truncation will cut, per task; ConfigError when the instruction cannot fit at evaluation
        self.prompt_truncation = prompt_truncation(self.encoder, self.tasks, self.max_prompt_len, ev.limit)
        config_checks.check_prompt_budget(self.prompt_truncation, ev, max_pos)
        self.targets = list(cfg.lora.target_modules)
        self.master = WeightMaster.attach(model, self.targets)  # before any weight changes
        # independent: every stage starts from W0, kept exactly (a CPU copy of the target weights)
        self.base_weights = (
            {
                name: self.master.value(name, linear.weight).detach().to("cpu", copy=True)
                for name, linear in target_linears(model, self.targets).items()
            }
            if self.mode == "independent"
            else None
        )
        self.history = History()
        self.models = Models(train=model, eval=model)
        return model

    # ---- the run ---------------------------------------------------------------------------
    def run(self, stream=None) -> dict[str, Any]:
        """`stream`: where the progress bars go (default sys.stderr). Ctrl-C / SIGTERM raise
        Interrupted at the next safe point (never inside an atomic write)."""
        self.progress = Progress(0, stream=stream, bars=bool(self.cfg.progress))
        with InterruptGuard(where=lambda: self.progress.where()):
            return self._run()

    def _run(self) -> dict[str, Any]:
        self.prepare()
        self.progress.T = len(self.stage_tasks)
        self.observers = Observers(
            [
                ProgressObserver(self.progress),
                TrackerObserver(self.cfg.logger, self.run_dir, self.job, self.dist.is_main),
                *self.extra_observers,
                KillPoints(),
            ]
        )
        with self.store.lock():
            previous = self.store.load_results(self.config, data_fingerprint(self.tasks))
            if previous and previous.get("complete"):
                log.info("run in %s is already complete; not redoing it", self.run_dir)
                self.results = previous
                return self.summarize()
            self.results = previous or self.new_results()
            if previous:  # a resume may run other code or on another machine: record each one
                self.results.setdefault("provenance", {}).setdefault("resumed", []).append(provenance(self.device))
            try:
                self._run_stages()
            except BaseException as exc:
                self.observers.on_failure(exc)
                self.results["status"] = (
                    f"interrupted during {exc.where}"
                    if isinstance(exc, Interrupted)
                    else f"failed: {type(exc).__name__}: {exc}"
                )
                self.results["complete"] = False
                self.store.save_results(self.results)
                raise
        return self.summarize()

    def summarize(self) -> dict[str, Any]:
        if self.dist.is_main:  # one summary on the console
            print(format_summary(self.results, self.run_dir))
        return self.results

    def _run_stages(self) -> None:
        model = self.load_model()
        self.results["prompt_truncation"] = self.prompt_truncation
        for line in truncation_lines(self.results):
            log.warning(line)
        self.observers.before_run(self.results)
        done, n_stages = len(self.results["stages"]), len(self.stage_tasks)
        self.trained = self.store.trained_through(done, n_stages)  # a crash may have hit the evaluation of stage done+1
        if self.trained:
            log.info("resuming after stage %d of %d (trained: %d)", done, n_stages, self.trained)
            self.restore(self.trained, model)
        self.dist.barrier("reading the run dir")  # every rank resumes from the same files
        if any(v is None for v in self.results["matrix"][0]):  # row 0 may be partial after an interrupt
            self.evaluate_row(0)
            self.store.save_results(self.results)
            self.observers.after_stage_saved(0, self.results)
        for stage in range(done + 1, n_stages + 1):
            self.run_stage(stage)
        self.finish()

    def context(self, stage: int) -> StageContext:
        cfg = self.cfg
        r, alpha, convention = int(cfg.lora.r), float(cfg.lora.alpha), str(cfg.lora.scaling)
        current = self.stage_tasks[stage - 1]
        # Only a sequential stage has earlier tasks; a reference-mode stage sees what stage 1 sees.
        previous, tasks = (
            (self.stage_tasks[: stage - 1], self.stage_tasks) if self.mode == "sequential" else ([], [current])
        )
        return StageContext(
            stage=stage,
            current=current,
            previous=previous,
            tasks=tasks,
            rank=r,
            alpha=alpha,
            scaling=lora_scaling(alpha, r, convention),
            scaling_convention=convention,
            target_modules=self.targets,
            device=self.device,
            seed=stage_seed(int(cfg.seed), stage),
            make_batches=lambda t, n, bs, seed, indices=None: self.encoder.batches(
                t, n, bs, seed, self.device, indices
            ),
            cache_dir=self.init_cache_dir,
            log=self.progress.init_log,
            adapter=adapter_name(stage),  # details to the log file
            grad_accum=int(cfg.trainer.grad_accum),
            history=self.history,
            master=self.master,
            run_seed=int(cfg.seed),
            dist=self.dist,
        )

    def restore(self, stage: int, model: torch.nn.Module) -> None:
        """Rebuild the models as stage `stage` left them on a freshly loaded model (resume)."""
        for record in self.store.history(stage):
            self.history.append(record)
        self.store.restore_stage(stage, model, self.targets, self.master, self.plugins)
        self.models = self.merger.restore(model, self.context(stage))

    def run_stage(self, stage: int) -> None:
        """Train stage `stage` (unless a resume restored it trained), evaluate its row, save."""
        record = self.store.read_stage(stage) if stage <= self.trained else self.train_stage(stage)
        with timed(record["seconds"], "eval"):
            self.evaluate_row(stage)
        self.results["stages"].append(record)
        self.store.save_results(self.results, barrier=f"saving stage {stage}")
        self.observers.after_stage_saved(stage, self.results)
        self.store.prune(stage)
        self.job.safe_point()  # stage saved: a pending preemption requeues here

    # ---- one stage, in the order of cl_bench/stage.py --------------------------------------
    def train_stage(self, stage: int) -> dict[str, Any]:
        """Train stage `stage` and save its files; returns its results.json "stages" entry."""
        ctx = self.context(stage)
        self.begin(ctx)
        seconds: dict[str, float] = {}
        self.observers.before_stage(stage, ctx.current.name)
        with timed(seconds, "init"):
            peft_model, init_stats, init_factors, scaling = self.start_adapter(ctx)
            if init_factors is not None:  # a resumed stage: back to the init its checkpoint trained from
                init_factors = self.checkpointed_init(peft_model, ctx, init_factors)
        self.observers.after_init(stage, init_stats, seconds["init"])
        start_init = init_factors  # what the in-stage checkpoints keep (begin_stage may change it below)
        self.hooks("begin_stage", peft_model, ctx)
        if ctx.init_absorbed:  # as training starts: begin_stage may have re-set A and re-folded (InfLoRA, GPM)
            init_factors = adapter_factors(peft_model, ctx.adapter)
        with timed(seconds, "train"):
            summary = self.train(peft_model, ctx, start_init)
        with timed(seconds, "end_stage"):  # e.g. EWC's Fisher, GPM's/InfLoRA's input memory
            self.hooks("end_stage", peft_model, ctx)
        with timed(seconds, "merge"):
            self.consolidate(peft_model, ctx, init_factors, scaling)
        record = {"stage": stage, "task": ctx.current.name, "init": init_stats, "train": summary, "seconds": seconds}
        if self.mode == "multitask":
            record["tasks"] = [t.name for t in self.tasks]
        self.store.save_stage(stage, record, self.models.train, self.targets, self.master)
        self.observers.after_stage_trained(stage, record)
        return record

    def begin(self, ctx: StageContext) -> None:
        """Seed the stage; independent: back to W0 (the last stage left W0 + τ_{t-1})."""
        torch.manual_seed(ctx.seed)
        if self.base_weights is not None:
            for name, linear in target_linears(self.models.train, self.targets).items():
                self.master.restore_(name, linear.weight, self.base_weights[name])

    def hooks(self, name: str, peft_model, ctx: StageContext) -> None:
        """`name` (begin_stage | end_stage) of initializer, regularizer, merge, in that order."""
        for plugin in self.plugins.values():
            getattr(plugin, name)(peft_model, ctx)

    def start_adapter(self, ctx: StageContext):
        """Wrap the train model with this stage's adapter and initialise it (absorbing if asked).

        Returns (peft model, init stats for results.json, absorbed init factors or None, s per module).
        """
        from peft import LoraConfig

        lora_config = LoraConfig(
            r=ctx.rank,
            lora_alpha=ctx.alpha,
            lora_dropout=float(self.cfg.lora.dropout),
            target_modules=self.targets,
            use_rslora=ctx.scaling_convention == "rslora",
            task_type="CAUSAL_LM",
            **self.initializer.lora_config_kwargs(),
        )
        self.initializer.before_wrap(self.models.train, lora_config, ctx)
        peft_model = add_adapter(self.models.train, lora_config, ctx.adapter)
        result = self.initializer.init(peft_model, ctx)
        scaling = set_scaling(peft_model, ctx.adapter, ctx.scaling_convention)
        share_init_factors(self.dist, result.factors, peft_model, ctx.adapter)
        if result.factors:
            result.stats["apply"] = apply_init(peft_model, result, ctx.adapter, self.master)
        elif result.absorb:  # PEFT absorbed in the model's dtype: the fp32 master follows
            follow_peft_absorption_(peft_model, ctx.adapter, self.master)
        share_started_adapter(self.dist, peft_model, ctx.adapter, self.master)
        ctx.init_absorbed = bool(result.absorb)
        init_factors = adapter_factors(peft_model, ctx.adapter) if result.absorb else None
        return peft_model, result.stats or {"method": self.initializer.name}, init_factors, scaling

    @torch.no_grad()
    def checkpointed_init(self, peft_model, ctx: StageContext, recomputed):
        """Before begin_stage of a stage that resumes from an in-stage checkpoint: the init ran again
        and folded W ← W_prev − s·B0'·A0', but the checkpointed adapter trained from the first
        attempt's (A0, B0). Fold the difference (W ← W + s·B0'·A0' − s·B0·A0), put (A0, B0) back in
        the adapter and return them: begin_stage (InfLoRA's A, GainLoRA's companion branch) and the
        checkpoint then continue from the init the stage started with, even where the recomputed one
        differs by rounding (another number of ranks, threads or device: the SVD of the captured
        gradient amplifies it). Without a complete checkpoint holding the init: `recomputed`."""
        from ..lora import task_vectors as merges

        saved = self.store.checkpoint_init(ctx.stage)
        if saved is None or set(saved) != set(recomputed):  # no checkpoint, or one from before inits were saved
            return recomputed
        layers = lora_layers(peft_model, ctx.adapter)
        for name, (A_new, B_new) in recomputed.items():
            layer = layers[name]
            s = float(layer.scaling[ctx.adapter])
            A0, B0 = saved[name]
            self.master.fold_(name, layer, merges.lora_delta(A_new, B_new, s) - merges.lora_delta(A0, B0, s))
            layer.lora_A[ctx.adapter].weight.copy_(A0)
            layer.lora_B[ctx.adapter].weight.copy_(B0)
        return saved

    def train(self, peft_model, ctx: StageContext, start_init) -> dict[str, Any]:
        """The stage's optimizer steps, resumed from its in-stage checkpoint when there is one.
        `start_init`: the absorbed init factors the stage started from (kept in its checkpoints)."""
        cfg = self.cfg
        tr = OmegaConf.to_container(cfg.trainer, resolve=True)
        # multitask: the joint stage's step cap is the sequential run's total (max_steps per task x T)
        tr["total_steps"] = steps_per_stage(
            len(ctx.current.train), cfg.trainer, len(self.tasks) if self.mode == "multitask" else 1
        )
        every = int(tr.get("checkpoint_every_steps") or 0)
        if self.job.preemptible:  # visit every step boundary: a preemption signal saves there
            tr["checkpoint_every_steps"] = 1
        resumed = self.store.load_checkpoint(ctx.stage, peft_model, self.plugins)
        if resumed:
            log.info("stage %d: resuming training at step %d", ctx.stage, resumed[0].step)
        self.observers.before_training(
            ctx.stage, ctx.current.name, tr["total_steps"], resumed[0].step if resumed else 0
        )
        summary = train_stage(
            peft_model,
            ctx,
            self.encoder,
            OmegaConf.create(tr),
            self.regularizer,
            state=resumed[0] if resumed else None,
            optimizer_state=resumed[1] if resumed else None,
            checkpoint=self.checkpointer(every, peft_model, ctx, start_init),
            plugins=list(self.plugins.values()),  # after_backward/after_step for all three
            progress=False,  # the display is an observer's, fed by on_step
            on_step=lambda step, terms: self.observers.after_train_step(ctx.stage, step, terms),
        )
        self.observers.after_training(ctx.stage, summary, peft_model)
        return summary

    def checkpointer(self, every: int, peft_model, ctx: StageContext, start_init):
        """The trainer's `checkpoint(state, opt, sched)`: the in-stage checkpoint every `every`
        steps (0: never), and a preemption's safe point, which saves when no checkpoint was just
        written (a preemptible job's trainer calls it at every step)."""
        write = self.store.checkpoint_writer(ctx.stage, peft_model, self.plugins, start_init)

        def checkpoint(st, opt, sch) -> None:
            save = lambda: write(st, opt, sch)  # noqa: E731
            if every and st.step % every == 0:
                save()
                save = None
            self.job.safe_point(save)

        return checkpoint

    def consolidate(self, peft_model, ctx: StageContext, init_factors, scaling) -> None:
        """Record the stage in the history (and its files), let the merge decide the models,
        save every plug-in's state."""
        trained = adapter_factors(peft_model, ctx.adapter)
        self.store.save_history(ctx.stage, ctx.current.name, ctx.adapter, trained, init_factors, scaling)
        self.history.append(
            StageRecord(ctx.stage, ctx.current.name, ctx.adapter, lambda: (trained, init_factors, scaling))
        )
        self.models = self.merger.consolidate(peft_model, ctx)
        self.store.save_plugin_states(ctx.stage, self.plugins)

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate_row(self, stage: int) -> None:
        """Row `stage` of the matrix (the tasks `mode` evaluates there), then GP/IP where due."""
        ev = self.cfg.evaluation
        row = self.results["matrix"][stage]
        shown = [j for j in range(len(self.tasks)) if modes.evaluated(self.mode, stage, j, bool(ev.full_matrix))]
        cache = self.prediction_cache() if stage == 0 and shown else None
        self.observers.before_eval_row(stage, len(shown))
        for j in shown:
            task = self.tasks[j]
            self.observers.before_eval_task(stage, j, task.name)
            score, records = evaluate_task(
                self.models.eval,
                self.tokenizer,
                task,
                batch_size=int(ev.batch_size),
                max_new_tokens=int(ev.max_new_tokens),
                max_prompt_len=self.max_prompt_len,
                device=self.device,
                prompt=self.encoder.prompt,
                limit=ev.limit,
                progress=False,
                protocol=str(ev.protocol),
                reference_margin=ev.get("reference_margin"),
                max_batch_tokens=eval_token_budget(ev.get("max_batch_tokens"), self.device),
                decode_step_tokens=int(ev.get("decode_step_tokens") or 0),
                dist=self.dist,
                cache=cache,
            )
            row[j] = score
            self.store.save_predictions(stage, task.name, records)
            self.observers.after_eval_task(stage, j, task.name, score)
        self.observers.after_eval_row(stage)
        if self.general_due(stage):
            self.observers.before_general(stage)
            self.results["general"][str(stage)] = self.general(stage)
            self.observers.after_general(stage, self.results["general"][str(stage)])

    def prediction_cache(self):
        """Row 0's prediction cache (evaluation/cache.py) under cache.dir/predictions, keyed by the
        eval model's content: the base model is the same in every run of a sweep. None unless
        cache.enabled and cache.row0, or when several processes share the evaluation."""
        cfg = self.cfg
        if not cfg.cache.enabled or not cfg.cache.get("row0", True) or self.dist.world > 1:
            return None
        from ..evaluation.cache import PredictionCache, digest
        from ..initializers.cache import model_state_fingerprint

        model = self.models.eval
        config = {k: v for k, v in model.config.to_dict().items() if not str(k).startswith("_")}
        versions = {k: v for k, v in package_versions().items() if k in ("torch", "transformers", "peft")}
        model_key = digest(
            "model",
            type(model).__name__,
            model_state_fingerprint(model),
            config,
            str(next(model.parameters()).dtype),
            self.device.type,
            model.config._attn_implementation,
            versions,
        )
        return PredictionCache(Path(str(cfg.cache.dir)) / "predictions", model_key, self.tokenizer, log=log.info)

    def general_due(self, stage: int) -> bool:
        """GP/IP are measured after `stage` (general_eval.when); independent: a mean over the T
        models, so one model alone is not worth measuring unless when=every_stage."""
        cfg = self.cfg
        return bool(
            self.general_eval
            and self.general_eval.should_run(cfg.general_eval, stage, len(self.stage_tasks))
            and not (self.mode == "independent" and stage and str(cfg.general_eval.get("when")) != "every_stage")
        )

    def general(self, stage: int) -> dict[str, Any]:
        """GP/IP of the eval model: on rank 0 alone, or under distributed=fsdp (where every forward
        pass needs every rank) on every rank on the same requests, rank 0's files and result kept."""
        cfg = self.cfg

        def evaluate() -> dict[str, Any]:
            with self.store.general_work_dir() as work_dir:
                return self.general_eval.evaluate_general(
                    self.models.eval,
                    self.tokenizer,
                    cfg.general_eval,
                    data_root=cfg.data.get("root"),
                    work_dir=work_dir,
                    device=self.device,
                    seed=int(cfg.seed),
                    prompt=self.encoder.prompt,
                    synced=self.dist.sharded,
                )

        if not self.dist.sharded:
            return self.dist.on_main(evaluate, "general evaluation on rank 0")
        return self.dist.broadcast_object(evaluate(), "sharing the general evaluation")

    def finish(self) -> None:
        metrics = compute_mode_metrics(self.results["matrix"], self.results["eval_sizes"], self.mode)
        gp_ip = {"GP": None, "IP": None}
        n_stages = len(self.stage_tasks)
        if self.general_eval and self.mode == "independent":
            # the mean over the T independent models (each task's own), when every one was measured
            per = [
                self.general_eval.aggregate_gp_ip(self.results["general"], self.cfg.general_eval, final_stage=s)
                for s in range(1, n_stages + 1)
            ]
            gp_ip = {
                k: (sum(p[k] for p in per) / n_stages if all(p[k] is not None for p in per) else None) for k in gp_ip
            }
        elif self.general_eval:
            gp_ip = self.general_eval.aggregate_gp_ip(
                self.results["general"], self.cfg.general_eval, final_stage=n_stages
            )
        metrics.update(gp_ip)
        self.results["metrics"] = metrics
        self.results["complete"] = True
        self.results["status"] = "complete"
        self.store.save_results(self.results)
        self.observers.after_run(self.results)


def run(cfg, run_dir: str | Path, stream=None, observers: Sequence[Observer] = ()) -> dict[str, Any]:
    """Run (or resume) the job `cfg` in `run_dir`; returns results.json's content.
    `stream`: where cl_bench's progress bars go (the console's stderr; default sys.stderr).
    `observers`: extra run/observers.Observer instances, told of every moment of the run."""
    config_checks.validate(cfg)  # one line for a bad value (seed=abc too) before anything runs
    with job_scope(int(cfg.seed)) as job:  # nothing leaks into the next job of this process
        return Runner(cfg, Path(run_dir), job, observers).run(stream)

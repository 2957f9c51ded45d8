"""The stage loop: the only place that knows the order of a stage (shared/DESIGN.md §1).

A stage is start_adapter → begin_stage hooks → train → end_stage hooks → consolidate →
evaluate; cl_bench/stage.py lists every hook in that order and says who may do what.
`mode` (cl_bench/modes.py) decides the stages: one per task on the last stage's model
(sequential), one joint stage on all tasks (multitask), or one per task from the base weights
(independent).
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from . import config as config_checks
from . import modes
from ..evaluation.baselines import baselines
from ..infra.console import Progress
from ..data.prompts import TrainingEncoder, prompt_format
from ..infra.distributed import Dist
from ..evaluation.seen import evaluate_task
from ..infra.errors import CLBenchError, ConfigError
from ..infra.faults import kill_point
from ..infra.jobs import Job, Requeued, cpu_threads, job_scope
from ..lora.layers import (
    validate_rank,
    WeightMaster, adapter_factors, add_adapter, apply_init, base_weight, follow_peft_absorption_, lora_layers, set_scaling,
    target_linears,
)
from ..evaluation.metrics import compute_mode_metrics
from ..data.models import load_model, model_unavailable, resolve_device, resolve_model_path
from ..infra.interrupt import InterruptGuard, Interrupted
from ..infra.files import SCHEMA, atomic_write_json, package_versions, provenance, write_jsonl
from .store import (
    RunLock, StageFiles, load_checkpoint, load_checkpoint_init, load_model_state, load_plugin_states, load_previous_results,
    load_stage_record, save_checkpoint, save_model_state, save_model_state_index, save_plugin_states, save_stage_record,
)
from ..stage import PLUGIN_GROUPS, History, Models, StageContext, StageRecord, adapter_name, stage_seed
from ..lora.layers import lora_scaling
from .summary import format_summary
from ..data.tasks import evaluation_record, load_sequence, split_stats
from .tracking import make_tracker
from ..train.trainer import check_layout, layout_of, steps_per_stage, train_stage

log = logging.getLogger("cl_bench")


def build_plugins(cfg) -> dict[str, Any]:
    """Instantiate initializer, regularizer and merge from their `_target_` (validates kwargs)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    plugins = {}
    for group in PLUGIN_GROUPS:
        try:
            plugins[group] = instantiate(cfg[group])
        except InstantiationException as exc:
            # Hydra wraps the plug-in's own one-line ConfigError; surface that, not the wrapper.
            if isinstance(exc.__cause__, CLBenchError):
                raise exc.__cause__ from None
            raise ConfigError(f"{group}: cannot build {cfg[group].get('_target_')!r}: {str(exc).splitlines()[-1]}") from None
    return plugins


class Runner:
    def __init__(self, cfg, run_dir: Path, job: Job | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.job = job or Job()  # preemption safe points and exit hooks (cl_bench/jobs.py)
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.dist = Dist()  # one process until prepare() reads the `distributed` group

    # ---- setup -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything that can fail on bad input, before the model is loaded."""
        cfg = self.cfg
        config_checks.validate(cfg)
        self.dist = Dist.from_config(cfg.get("distributed"))  # rank logic: cl_bench/distributed.py
        self.device = self.dist.device(resolve_device(str(cfg.device)))
        self.dist.check_step_size(int(cfg.trainer.batch_size) * int(cfg.trainer.grad_accum))
        threads, why = cpu_threads(cfg.get("threads"))
        torch.set_num_threads(threads)
        log.info("torch CPU threads: %d (%s)", threads, why)
        self.tasks = load_sequence(cfg.sequence, cfg.data.get("root"), int(cfg.seed))
        self.plugins = build_plugins(cfg)
        self.initializer, self.regularizer, self.merger = (self.plugins[g] for g in PLUGIN_GROUPS)
        self.dist.check_plugins(self.plugins, cfg)  # distributed=fsdp: the plug-ins that work on sharded weights
        # sequential | multitask (one joint stage) | independent (each stage from the base model): modes.py
        self.mode = modes.check_mode(cfg.get("mode", "sequential"))
        modes.check_plugins(self.mode, self.initializer, self.regularizer, self.merger, cfg.initializer)
        self.stage_tasks = modes.stage_tasks(self.mode, self.tasks)
        check_layout(layout_of(cfg.trainer), self.regularizer)
        self.general_eval = None  # lm-eval is imported only when general capability is measured
        if str(cfg.general_eval.get("when", "none")) != "none":
            from ..evaluation import general as general_eval

            general_eval.parse_config(cfg.general_eval)  # one-line ConfigError on bad values
            general_eval.check_data(cfg.general_eval, cfg.data.get("root"))  # before the model loads
            self.general_eval = general_eval
        cache_dir = str(cfg.cache.dir) if cfg.cache.enabled else None
        self.model_path = resolve_model_path(cfg.model, str(cfg.cache.dir), log=log.info)
        try:
            shapes = config_checks.module_shapes(self.model_path, list(cfg.lora.target_modules), bool(cfg.model.get("trust_remote_code", False)))
        except (OSError, ValueError):
            raise model_unavailable(self.model_path) from None
        validate_rank(shapes, int(cfg.lora.r), list(cfg.lora.target_modules))
        self.initializer.validate(shapes, int(cfg.lora.r))
        self.init_cache_dir = str(Path(cache_dir) / "inits") if cache_dir else None

    def new_results(self) -> dict[str, Any]:
        T = len(self.tasks)
        return {
            "schema": SCHEMA, "sequence": str(self.cfg.sequence.name), "tasks": [t.name for t in self.tasks], "mode": self.mode,
            "matrix": [[None] * T for _ in range(len(self.stage_tasks) + 1)], "metrics": {}, "general": {}, "stages": [],
            "eval_sizes": [len(t.eval[: self.cfg.evaluation.limit or None]) for t in self.tasks],
            "split_stats": split_stats(self.tasks),
            "evaluation": evaluation_record(self.tasks, str(self.cfg.evaluation.protocol)),
            "config": self.config, "versions": package_versions(), "complete": False, "status": "running",
            "baselines": baselines(self.tasks, self.cfg.evaluation.limit), "provenance": provenance(self.device),
        }

    def save(self) -> None:
        if self.dist.is_main:  # every rank holds the same results; rank 0 writes every file
            atomic_write_json(self.run_dir / "results.json", self.results)

    @contextlib.contextmanager
    def lock(self):
        """The run-dir lock, held by rank 0; the other ranks get its error if it is taken."""
        lock = RunLock(self.run_dir)
        self.dist.on_main(lambda: lock.__enter__() and None, "taking the run-dir lock")
        try:
            yield
        finally:
            lock.__exit__()

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
        with self.lock():
            previous = load_previous_results(self.run_dir, self.config)
            if previous and previous.get("complete"):
                log.info("run in %s is already complete; not redoing it", self.run_dir)
                self.results = previous
                if self.dist.is_main:
                    print(format_summary(previous, self.run_dir))
                return previous
            self.results = previous or self.new_results()
            if previous:  # a resume may run other code or on another machine: record each one
                self.results.setdefault("provenance", {}).setdefault("resumed", []).append(provenance(self.device))
            try:
                self._run_stages()
            except BaseException as exc:
                self.progress.close()
                self.results["status"] = f"interrupted during {exc.where}" if isinstance(exc, Interrupted) else f"failed: {type(exc).__name__}: {exc}"
                self.results["complete"] = False
                self.save()
                raise
        if self.dist.is_main:
            print(format_summary(self.results, self.run_dir))
        return self.results

    def _run_stages(self) -> None:
        cfg = self.cfg
        sharded = self.dist.sharded  # fsdp: rank 0 alone reads the weights, on the CPU; shard_model spreads them
        model, self.tokenizer = load_model(cfg.model, self.device, str(cfg.cache.dir), log=log.info, place=not sharded,
                                           weights=not sharded or self.dist.is_main)
        model = self.dist.shard_model(model, log=log.info)  # distributed=fsdp; before the master copies any weight
        self.tracker = make_tracker(cfg.logger if self.dist.is_main else {}, self.results, self.run_dir)
        self.job.on_exit(lambda exc: self.tracker.close(exit_code=1, preempted=isinstance(exc, Requeued)))
        tr, ev = cfg.trainer, cfg.evaluation
        # Never feed more positions than the model has (the tiny model has 512).
        max_pos = getattr(model.config, "max_position_embeddings", None) or 10**9
        self.max_prompt_len = min(int(ev.max_prompt_len), max_pos - int(ev.max_new_tokens))
        self.encoder = TrainingEncoder(self.tokenizer, min(int(tr.max_len), max_pos), bool(tr.mask_prompt), prompt_format(ev))
        self.targets = list(cfg.lora.target_modules)
        self.master = WeightMaster.attach(model, self.targets)  # before any weight changes
        # independent: every stage starts from W0, kept exactly (a CPU copy of the target weights)
        self.base_weights = {name: self.master.value(name, linear.weight).detach().to("cpu", copy=True)
                             for name, linear in target_linears(model, self.targets).items()} if self.mode == "independent" else None
        self.history = History()
        self.models = Models(train=model, eval=model)
        done, n_stages = len(self.results["stages"]), len(self.stage_tasks)
        # A stage whose model state exists was trained and merged before a crash in its evaluation.
        self.trained = done + 1 if done < n_stages and StageFiles(self.run_dir, done + 1).model_state.exists() else done
        if self.trained:
            log.info("resuming after stage %d of %d (trained: %d)", done, n_stages, self.trained)
            self.restore(self.trained, model)
        self.dist.barrier("reading the run dir")  # every rank resumes from the same files
        if any(v is None for v in self.results["matrix"][0]):  # row 0 may be partial after an interrupt
            self.evaluate_row(0)
            self.save()
            self.tracker.log_stage(0, self.results)
        for stage in range(done + 1, n_stages + 1):
            self.run_stage(stage)
        self.finish()

    def context(self, stage: int) -> StageContext:
        cfg = self.cfg
        r, alpha, convention = int(cfg.lora.r), float(cfg.lora.alpha), str(cfg.lora.scaling)
        current = self.stage_tasks[stage - 1]
        # Only a sequential stage has earlier tasks; a reference-mode stage sees what stage 1 sees.
        previous, tasks = (self.stage_tasks[: stage - 1], self.stage_tasks) if self.mode == "sequential" else ([], [current])
        return StageContext(
            stage=stage, current=current, previous=previous, tasks=tasks,
            rank=r, alpha=alpha, scaling=lora_scaling(alpha, r, convention), scaling_convention=convention,
            target_modules=self.targets, device=self.device, seed=stage_seed(int(cfg.seed), stage),
            make_batches=lambda t, n, bs, seed, indices=None: self.encoder.batches(t, n, bs, seed, self.device, indices),
            cache_dir=self.init_cache_dir, log=self.progress.init_log, adapter=adapter_name(stage),  # details to the log file
            grad_accum=int(cfg.trainer.grad_accum), history=self.history, master=self.master, run_seed=int(cfg.seed),
            dist=self.dist,
        )

    def restore(self, stage: int, model: torch.nn.Module) -> None:
        """Rebuild the models as stage `stage` left them on a freshly loaded model (resume)."""
        for s in range(1, stage + 1):
            self.history.append(load_stage_record(StageFiles(self.run_dir, s)))
        files = StageFiles(self.run_dir, stage)
        load_model_state(files, model, self.targets, self.master)
        load_plugin_states(files.dir, self.plugins)
        self.models = self.merger.restore(model, self.context(stage))

    def run_stage(self, stage: int) -> None:
        files = StageFiles(self.run_dir, stage)
        if stage <= self.trained:  # restored by _run_stages: only its evaluation is missing
            record = _read_json(files.dir / "stage.json")
        else:
            record = self.train_stage(stage, files)
        t0 = time.time()
        self.evaluate_row(stage)
        record["seconds"]["eval"] = time.time() - t0
        self.results["stages"].append(record)
        self.save()
        self.dist.barrier(f"saving stage {stage}")
        self.tracker.log_stage(stage, self.results)
        kill_point(f"saved:{stage}")
        # Only the latest model and plug-in states are needed to resume; older ones cost a model each.
        if stage > 1 and self.dist.is_main:
            older = StageFiles(self.run_dir, stage - 1)
            for path in (*older.model_state_files(), *(older.state(g) for g in PLUGIN_GROUPS)):
                path.unlink(missing_ok=True)
        self.job.safe_point()  # stage saved: a pending preemption requeues here

    def train_stage(self, stage: int, files: StageFiles) -> dict[str, Any]:
        ctx = self.context(stage)
        torch.manual_seed(ctx.seed)
        if self.base_weights is not None:  # independent: back to W0 (the last stage left W0 + τ_{t-1})
            for name, linear in target_linears(self.models.train, self.targets).items():
                self.master.restore_(name, linear.weight, self.base_weights[name])
        seconds: dict[str, float] = {}
        self.progress.init_begin(stage, ctx.current.name)
        t0 = time.time()
        peft_model, init_stats, init_factors, scaling = self.start_adapter(ctx)
        if init_factors is not None:  # a resumed stage: back to the init its checkpoint trained from
            init_factors = self.checkpointed_init(peft_model, ctx, files, init_factors)
        start_init = init_factors  # what the in-stage checkpoints keep (begin_stage may change it below)
        seconds["init"] = time.time() - t0
        self.progress.init_end(init_stats, seconds["init"])
        for plugin in self.plugins.values():
            plugin.begin_stage(peft_model, ctx)
        if ctx.init_absorbed:  # as training starts: begin_stage may have re-set A and re-folded (InfLoRA, GPM)
            init_factors = adapter_factors(peft_model, ctx.adapter)
        t0 = time.time()
        train_summary = self.train(peft_model, ctx, files, start_init)
        seconds["train"] = time.time() - t0
        t0 = time.time()
        for plugin in self.plugins.values():
            plugin.end_stage(peft_model, ctx)
        seconds["end_stage"] = time.time() - t0  # e.g. EWC's Fisher, GPM's/InfLoRA's input memory
        t0 = time.time()
        self.consolidate(peft_model, ctx, files, init_factors, scaling)
        seconds["merge"] = time.time() - t0
        record = {"stage": stage, "task": ctx.current.name, "init": init_stats, "train": train_summary, "seconds": seconds}
        if self.mode == "multitask":
            record["tasks"] = [t.name for t in self.tasks]
        if self.dist.sharded:  # every rank its rows, then the index that marks the state saved
            save_model_state(files, self.models.train, self.targets, self.master, shard=(self.dist.rank, self.dist.world))
            self.dist.barrier(f"saving the model state of stage {stage}")
        if self.dist.is_main:
            atomic_write_json(files.dir / "stage.json", record)
            if self.dist.sharded:
                save_model_state_index(files, self.dist.world)
            else:
                save_model_state(files, self.models.train, self.targets, self.master)  # marks "trained": eval may be redone alone
            _remove_tree(files.checkpoint)
        return record

    def start_adapter(self, ctx: StageContext):
        """Wrap the train model with this stage's adapter and initialise it (absorbing if asked).

        Returns (peft model, init stats for results.json, absorbed init factors or None, s per module).
        """
        from peft import LoraConfig

        cfg = self.cfg
        lora_config = LoraConfig(
            r=ctx.rank, lora_alpha=ctx.alpha, lora_dropout=float(cfg.lora.dropout), target_modules=self.targets,
            use_rslora=ctx.scaling_convention == "rslora", task_type="CAUSAL_LM", **self.initializer.lora_config_kwargs(),
        )
        self.initializer.before_wrap(self.models.train, lora_config, ctx)
        peft_model = add_adapter(self.models.train, lora_config, ctx.adapter)
        result = self.initializer.init(peft_model, ctx)
        scaling = set_scaling(peft_model, ctx.adapter, ctx.scaling_convention)
        if self.dist.sharded:  # every rank folds its own rows: all must fold rank 0's factors
            self.dist.broadcast_([t for A, B in (result.factors or {}).values() for t in (A, B)]
                                 + [t for layer in lora_layers(peft_model, ctx.adapter).values()
                                    for t in (layer.lora_A[ctx.adapter].weight, layer.lora_B[ctx.adapter].weight)],
                                 "broadcasting the stage's init")
        if result.factors:
            result.stats["apply"] = apply_init(peft_model, result, ctx.adapter, self.master)
        elif result.absorb:  # PEFT absorbed in the model's dtype: the fp32 master follows
            follow_peft_absorption_(peft_model, ctx.adapter, self.master)
        if self.dist.world > 1 and not self.dist.sharded:  # every rank computed the init; all continue from rank 0's, bit for bit
            layers = lora_layers(peft_model, ctx.adapter).values()
            self.dist.broadcast_([t for layer in layers for t in (base_weight(layer), layer.lora_A[ctx.adapter].weight,
                                                                     layer.lora_B[ctx.adapter].weight)]
                                 + list(self.master.tensors.values()), "broadcasting the stage's init")
        ctx.init_absorbed = bool(result.absorb)
        init_factors = adapter_factors(peft_model, ctx.adapter) if result.absorb else None
        return peft_model, result.stats or {"method": self.initializer.name}, init_factors, scaling

    def train(self, peft_model, ctx: StageContext, files: StageFiles, start_init) -> dict[str, Any]:
        """The stage's optimizer steps, resumed from its in-stage checkpoint when there is one.
        `start_init`: the absorbed init factors the stage started from (kept in its checkpoints)."""
        cfg = self.cfg
        tr = OmegaConf.to_container(cfg.trainer, resolve=True)
        # multitask: the joint stage's step cap is the sequential run's total (max_steps per task x T)
        tr["total_steps"] = steps_per_stage(len(ctx.current.train), cfg.trainer, len(self.tasks) if self.mode == "multitask" else 1)
        resumed = load_checkpoint(files, peft_model)
        every = int(tr.get("checkpoint_every_steps") or 0)
        if self.job.preemptible:  # visit every step boundary: a preemption signal saves there
            tr["checkpoint_every_steps"] = 1

        def checkpoint(st, opt, sch):
            save = lambda: self.dist.is_main and save_checkpoint(files, peft_model, st, opt, sch, self.plugins, start_init)  # noqa: E731
            if every and st.step % every == 0:
                save()
                save = None
            self.job.safe_point(save)

        if resumed:
            load_plugin_states(files.checkpoint, self.plugins)
            log.info("stage %d: resuming training at step %d", ctx.stage, resumed[0].step)
        self.progress.train_begin(ctx.stage, ctx.current.name, tr["total_steps"], resumed[0].step if resumed else 0)
        summary = train_stage(
            peft_model, ctx, self.encoder, OmegaConf.create(tr), self.regularizer,
            state=resumed[0] if resumed else None, optimizer_state=resumed[1] if resumed else None,
            checkpoint=checkpoint, plugins=list(self.plugins.values()),  # after_backward/after_step for all three
            progress=False,  # the display is self.progress's, fed by on_step
            on_step=lambda step, terms: (self.tracker.log_step(ctx.stage, step, terms), self.progress.train_step(step, terms),
                                         kill_point(f"train:{ctx.stage}:{step}")),
        )
        self.progress.train_end(summary)
        return summary

    @torch.no_grad()
    def checkpointed_init(self, peft_model, ctx: StageContext, files: StageFiles, recomputed):
        """Before begin_stage of a stage that resumes from an in-stage checkpoint: the init ran again
        and folded W ← W_prev − s·B0'·A0', but the checkpointed adapter trained from the first
        attempt's (A0, B0). Fold the difference (W ← W + s·B0'·A0' − s·B0·A0), put (A0, B0) back in
        the adapter and return them: begin_stage (InfLoRA's A, GainLoRA's companion branch) and the
        checkpoint then continue from the init the stage started with, even where the recomputed one
        differs by rounding (another number of ranks, threads or device: the SVD of the captured
        gradient amplifies it). Without a complete checkpoint holding the init: `recomputed`."""
        from ..lora import task_vectors as merges

        saved = load_checkpoint_init(files) if (files.checkpoint / "state.json").exists() else None
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

    def consolidate(self, peft_model, ctx: StageContext, files: StageFiles, init_factors, scaling) -> None:
        """Record the stage in the history (and its files), let the merge decide the models,
        save every plug-in's state."""
        trained = adapter_factors(peft_model, ctx.adapter)
        if self.dist.is_main:
            save_stage_record(files, ctx.stage, ctx.current.name, ctx.adapter, trained, init_factors, scaling)
        self.history.append(StageRecord(ctx.stage, ctx.current.name, ctx.adapter, lambda: (trained, init_factors, scaling)))
        self.models = self.merger.consolidate(peft_model, ctx)
        if self.dist.is_main:
            save_plugin_states(files.dir, self.plugins)

    def evaluate_row(self, stage: int) -> None:
        cfg = self.cfg
        ev = cfg.evaluation
        row = self.results["matrix"][stage]
        shown = [j for j in range(len(self.tasks)) if modes.evaluated(self.mode, stage, j, bool(ev.full_matrix))]
        self.progress.eval_begin(stage, len(shown))
        for j, task in enumerate(self.tasks):
            if j not in shown:
                continue
            self.progress.eval_task_begin(task.name)
            score, records = evaluate_task(
                self.models.eval, self.tokenizer, task, batch_size=int(ev.batch_size), max_new_tokens=int(ev.max_new_tokens),
                max_prompt_len=self.max_prompt_len, device=self.device, prompt=self.encoder.prompt,
                limit=ev.limit, progress=False, protocol=str(ev.protocol), reference_margin=ev.get("reference_margin"),
                dist=self.dist,
            )
            self.progress.eval_task_end(task.name, score)
            row[j] = score
            if self.dist.is_main:
                write_jsonl(self.run_dir / "predictions" / f"stage_{stage:02d}" / f"{task.name}.jsonl", records)
            kill_point(f"eval:{stage}:{j}")
        self.progress.eval_end()
        if self.general_eval and self.general_eval.should_run(cfg.general_eval, stage, len(self.stage_tasks)) and not (
                # independent: GP/IP are a mean over the T models, so one model alone is not worth measuring
                self.mode == "independent" and stage and str(cfg.general_eval.get("when")) != "every_stage"):
            self.progress.general_begin(stage)
            self.results["general"][str(stage)] = self.general(stage)
            self.progress.general_end(self.results["general"][str(stage)])

    def general(self, stage: int) -> dict[str, Any]:
        """GP/IP of the eval model: on rank 0 alone, or under distributed=fsdp (where every forward
        pass needs every rank) on every rank on the same requests, rank 0's files and result kept."""
        cfg = self.cfg

        def evaluate(work_dir: str) -> dict[str, Any]:
            return self.general_eval.evaluate_general(
                self.models.eval, self.tokenizer, cfg.general_eval, data_root=cfg.data.get("root"), work_dir=work_dir,
                device=self.device, seed=int(cfg.seed), prompt=self.encoder.prompt, synced=self.dist.sharded)

        if not self.dist.sharded:
            return self.dist.on_main(lambda: evaluate(str(self.run_dir / "general_eval")), "general evaluation on rank 0")
        import tempfile

        if self.dist.is_main:
            value = evaluate(str(self.run_dir / "general_eval"))
        else:  # the same requests, written where rank 0's files are not
            with tempfile.TemporaryDirectory(prefix=f"cl_bench_rank{self.dist.rank}_") as scratch:
                value = evaluate(scratch)
        return self.dist.broadcast_object(value, "sharing the general evaluation")

    def finish(self) -> None:
        metrics = compute_mode_metrics(self.results["matrix"], self.results["eval_sizes"], self.mode)
        gp_ip = {"GP": None, "IP": None}
        n_stages = len(self.stage_tasks)
        if self.general_eval and self.mode == "independent":
            # the mean over the T independent models (each task's own), when every one was measured
            per = [self.general_eval.aggregate_gp_ip(self.results["general"], self.cfg.general_eval, final_stage=s) for s in range(1, n_stages + 1)]
            gp_ip = {k: (sum(p[k] for p in per) / n_stages if all(p[k] is not None for p in per) else None) for k in gp_ip}
        elif self.general_eval:
            gp_ip = self.general_eval.aggregate_gp_ip(self.results["general"], self.cfg.general_eval, final_stage=n_stages)
        metrics.update(gp_ip)
        self.results["metrics"] = metrics
        self.results["complete"] = True
        self.results["status"] = "complete"
        self.save()
        self.tracker.finish(self.results)


def _read_json(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text())


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def run(cfg, run_dir: str | Path, stream=None) -> dict[str, Any]:
    """`stream`: where cl_bench's progress bars go (the console's stderr; default sys.stderr)."""
    with job_scope(int(cfg.seed)) as job:  # nothing leaks into the next job of this process
        return Runner(cfg, Path(run_dir), job).run(stream)

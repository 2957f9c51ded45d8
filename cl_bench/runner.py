"""The stage loop: the only place that knows the order of a stage (shared/DESIGN.md §1).

A stage is start_adapter → begin_stage hooks → train → end_stage hooks → consolidate →
evaluate; cl_bench/stage.py lists every hook in that order and says who may do what.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from . import config as config_checks
from .baselines import baselines
from .console import Progress
from .data import TrainingEncoder, prompt_format
from .evaluation import evaluate_task
from .errors import CLBenchError, ConfigError
from .faults import kill_point
from .jobs import Job, Requeued, job_scope
from .lora import WeightMaster, adapter_factors, add_adapter, apply_init, follow_peft_absorption_, set_scaling
from .metrics import compute_cl_metrics
from .models import load_model, model_unavailable, resolve_device, resolve_model_path
from .interrupt import InterruptGuard, Interrupted
from .results import SCHEMA, atomic_write_json, package_versions, provenance, write_jsonl
from .run_dir import (
    RunLock, StageFiles, load_checkpoint, load_model_state, load_plugin_states, load_previous_results,
    load_stage_record, save_checkpoint, save_model_state, save_plugin_states, save_stage_record,
)
from .stage import PLUGIN_GROUPS, History, Models, StageContext, StageRecord, adapter_name, lora_scaling, stage_seed
from .summary import format_summary
from .tasks import evaluation_record, load_sequence, split_stats
from .tracking import make_tracker
from .training import steps_per_stage, train_stage

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

    # ---- setup -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything that can fail on bad input, before the model is loaded."""
        cfg = self.cfg
        config_checks.validate(cfg)
        self.device = resolve_device(str(cfg.device))
        if cfg.get("threads") is not None:
            torch.set_num_threads(int(cfg.threads))
        self.tasks = load_sequence(cfg.sequence, cfg.data.get("root"), int(cfg.seed))
        self.plugins = build_plugins(cfg)
        self.initializer, self.regularizer, self.merger = (self.plugins[g] for g in PLUGIN_GROUPS)
        self.general_eval = None  # lm-eval is imported only when general capability is measured
        if str(cfg.general_eval.get("when", "none")) != "none":
            from . import general_eval

            general_eval.parse_config(cfg.general_eval)  # one-line ConfigError on bad values
            general_eval.check_data(cfg.general_eval, cfg.data.get("root"))  # before the model loads
            self.general_eval = general_eval
        cache_dir = str(cfg.cache.dir) if cfg.cache.enabled else None
        self.model_path = resolve_model_path(cfg.model, str(cfg.cache.dir), log=log.info)
        try:
            shapes = config_checks.module_shapes(self.model_path, list(cfg.lora.target_modules), bool(cfg.model.get("trust_remote_code", False)))
        except (OSError, ValueError):
            raise model_unavailable(self.model_path) from None
        config_checks.validate_rank(shapes, int(cfg.lora.r), list(cfg.lora.target_modules))
        self.initializer.validate(shapes, int(cfg.lora.r))
        self.init_cache_dir = str(Path(cache_dir) / "inits") if cache_dir else None

    def new_results(self) -> dict[str, Any]:
        T = len(self.tasks)
        return {
            "schema": SCHEMA, "sequence": str(self.cfg.sequence.name), "tasks": [t.name for t in self.tasks],
            "matrix": [[None] * T for _ in range(T + 1)], "metrics": {}, "general": {}, "stages": [],
            "eval_sizes": [len(t.eval[: self.cfg.evaluation.limit or None]) for t in self.tasks],
            "split_stats": split_stats(self.tasks),
            "evaluation": evaluation_record(self.tasks, str(self.cfg.evaluation.protocol)),
            "config": self.config, "versions": package_versions(), "complete": False, "status": "running",
            "baselines": baselines(self.tasks, self.cfg.evaluation.limit), "provenance": provenance(self.device),
        }

    def save(self) -> None:
        atomic_write_json(self.run_dir / "results.json", self.results)

    # ---- the run ---------------------------------------------------------------------------
    def run(self, stream=None) -> dict[str, Any]:
        """`stream`: where the progress bars go (default sys.stderr). Ctrl-C / SIGTERM raise
        Interrupted at the next safe point (never inside an atomic write)."""
        self.progress = Progress(0, stream=stream, bars=bool(self.cfg.progress))
        with InterruptGuard(where=lambda: self.progress.where()):
            return self._run()

    def _run(self) -> dict[str, Any]:
        self.prepare()
        self.progress.T = len(self.tasks)
        with RunLock(self.run_dir):
            previous = load_previous_results(self.run_dir, self.config)
            if previous and previous.get("complete"):
                log.info("run in %s is already complete; not redoing it", self.run_dir)
                self.results = previous
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
        print(format_summary(self.results, self.run_dir))
        return self.results

    def _run_stages(self) -> None:
        cfg = self.cfg
        model, self.tokenizer = load_model(cfg.model, self.device, str(cfg.cache.dir), log=log.info)
        self.tracker = make_tracker(cfg.logger, self.results, self.run_dir)
        self.job.on_exit(lambda exc: self.tracker.close(exit_code=1, preempted=isinstance(exc, Requeued)))
        tr, ev = cfg.trainer, cfg.evaluation
        # Never feed more positions than the model has (the tiny model has 512).
        max_pos = getattr(model.config, "max_position_embeddings", None) or 10**9
        self.max_prompt_len = min(int(ev.max_prompt_len), max_pos - int(ev.max_new_tokens))
        self.encoder = TrainingEncoder(self.tokenizer, min(int(tr.max_len), max_pos), bool(tr.mask_prompt), prompt_format(ev))
        self.targets = list(cfg.lora.target_modules)
        self.master = WeightMaster.attach(model, self.targets)  # before any weight changes
        self.history = History()
        self.models = Models(train=model, eval=model)
        done = len(self.results["stages"])
        # A stage whose model state exists was trained and merged before a crash in its evaluation.
        self.trained = done + 1 if done < len(self.tasks) and StageFiles(self.run_dir, done + 1).model_state.exists() else done
        if self.trained:
            log.info("resuming after stage %d of %d (trained: %d)", done, len(self.tasks), self.trained)
            self.restore(self.trained, model)
        if any(v is None for v in self.results["matrix"][0]):  # row 0 may be partial after an interrupt
            self.evaluate_row(0)
            self.save()
            self.tracker.log_stage(0, self.results)
        for stage in range(done + 1, len(self.tasks) + 1):
            self.run_stage(stage)
        self.finish()

    def context(self, stage: int) -> StageContext:
        cfg = self.cfg
        r, alpha, convention = int(cfg.lora.r), float(cfg.lora.alpha), str(cfg.lora.scaling)
        return StageContext(
            stage=stage, current=self.tasks[stage - 1], previous=self.tasks[: stage - 1], tasks=self.tasks,
            rank=r, alpha=alpha, scaling=lora_scaling(alpha, r, convention), scaling_convention=convention,
            target_modules=self.targets, device=self.device, seed=stage_seed(int(cfg.seed), stage),
            make_batches=lambda t, n, bs, seed, indices=None: self.encoder.batches(t, n, bs, seed, self.device, indices),
            cache_dir=self.init_cache_dir, log=self.progress.init_log, adapter=adapter_name(stage),  # details to the log file
            grad_accum=int(cfg.trainer.grad_accum), history=self.history, master=self.master, run_seed=int(cfg.seed),
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
        self.tracker.log_stage(stage, self.results)
        kill_point(f"saved:{stage}")
        # Only the latest model and plug-in states are needed to resume; older ones cost a model each.
        if stage > 1:
            older = StageFiles(self.run_dir, stage - 1)
            for path in (older.model_state, *(older.state(g) for g in PLUGIN_GROUPS)):
                path.unlink(missing_ok=True)
        self.job.safe_point()  # stage saved: a pending preemption requeues here

    def train_stage(self, stage: int, files: StageFiles) -> dict[str, Any]:
        ctx = self.context(stage)
        torch.manual_seed(ctx.seed)
        seconds: dict[str, float] = {}
        self.progress.init_begin(stage, ctx.current.name)
        t0 = time.time()
        peft_model, init_stats, init_factors, scaling = self.start_adapter(ctx)
        seconds["init"] = time.time() - t0
        self.progress.init_end(init_stats, seconds["init"])
        for plugin in self.plugins.values():
            plugin.begin_stage(peft_model, ctx)
        if ctx.init_absorbed:  # as training starts: begin_stage may have re-set A and re-folded (InfLoRA, GPM)
            init_factors = adapter_factors(peft_model, ctx.adapter)
        t0 = time.time()
        train_summary = self.train(peft_model, ctx, files)
        seconds["train"] = time.time() - t0
        t0 = time.time()
        for plugin in self.plugins.values():
            plugin.end_stage(peft_model, ctx)
        seconds["end_stage"] = time.time() - t0  # e.g. EWC's Fisher, GPM's/InfLoRA's input memory
        t0 = time.time()
        self.consolidate(peft_model, ctx, files, init_factors, scaling)
        seconds["merge"] = time.time() - t0
        record = {"stage": stage, "task": ctx.current.name, "init": init_stats, "train": train_summary, "seconds": seconds}
        atomic_write_json(files.dir / "stage.json", record)
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
        if result.factors:
            result.stats["apply"] = apply_init(peft_model, result, ctx.adapter, self.master)
        elif result.absorb:  # PEFT absorbed in the model's dtype: the fp32 master follows
            follow_peft_absorption_(peft_model, ctx.adapter, self.master)
        ctx.init_absorbed = bool(result.absorb)
        init_factors = adapter_factors(peft_model, ctx.adapter) if result.absorb else None
        return peft_model, result.stats or {"method": self.initializer.name}, init_factors, scaling

    def train(self, peft_model, ctx: StageContext, files: StageFiles) -> dict[str, Any]:
        """The stage's optimizer steps, resumed from its in-stage checkpoint when there is one."""
        cfg = self.cfg
        tr = OmegaConf.to_container(cfg.trainer, resolve=True)
        tr["total_steps"] = steps_per_stage(len(ctx.current.train), cfg.trainer)
        resumed = load_checkpoint(files, peft_model)
        every = int(tr.get("checkpoint_every_steps") or 0)
        if self.job.preemptible:  # visit every step boundary: a preemption signal saves there
            tr["checkpoint_every_steps"] = 1

        def checkpoint(st, opt, sch):
            save = lambda: save_checkpoint(files, peft_model, st, opt, sch, self.plugins)  # noqa: E731
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
            checkpoint=checkpoint,
            progress=False,  # the display is self.progress's, fed by on_step
            on_step=lambda step, terms: (self.tracker.log_step(ctx.stage, step, terms), self.progress.train_step(step, terms),
                                         kill_point(f"train:{ctx.stage}:{step}")),
        )
        self.progress.train_end(summary)
        return summary

    def consolidate(self, peft_model, ctx: StageContext, files: StageFiles, init_factors, scaling) -> None:
        """Record the stage in the history (and its files), let the merge decide the models,
        save every plug-in's state."""
        trained = adapter_factors(peft_model, ctx.adapter)
        save_stage_record(files, ctx.stage, ctx.current.name, ctx.adapter, trained, init_factors, scaling)
        self.history.append(StageRecord(ctx.stage, ctx.current.name, ctx.adapter, lambda: (trained, init_factors, scaling)))
        self.models = self.merger.consolidate(peft_model, ctx)
        save_plugin_states(files.dir, self.plugins)

    def evaluate_row(self, stage: int) -> None:
        cfg = self.cfg
        ev = cfg.evaluation
        row = self.results["matrix"][stage]
        self.progress.eval_begin(stage, len(self.tasks) if ev.full_matrix or not stage else stage)
        for j, task in enumerate(self.tasks):
            if not ev.full_matrix and stage and j >= stage:
                continue
            self.progress.eval_task_begin(task.name)
            score, records = evaluate_task(
                self.models.eval, self.tokenizer, task, batch_size=int(ev.batch_size), max_new_tokens=int(ev.max_new_tokens),
                max_prompt_len=self.max_prompt_len, device=self.device, prompt=self.encoder.prompt,
                limit=ev.limit, progress=False, protocol=str(ev.protocol),
            )
            self.progress.eval_task_end(task.name, score)
            row[j] = score
            write_jsonl(self.run_dir / "predictions" / f"stage_{stage:02d}" / f"{task.name}.jsonl", records)
            kill_point(f"eval:{stage}:{j}")
        self.progress.eval_end()
        if self.general_eval and self.general_eval.should_run(cfg.general_eval, stage, len(self.tasks)):
            self.progress.general_begin(stage)
            self.results["general"][str(stage)] = self.general_eval.evaluate_general(
                self.models.eval, self.tokenizer, cfg.general_eval, data_root=cfg.data.get("root"),
                work_dir=str(self.run_dir / "general_eval"), device=self.device, seed=int(cfg.seed),
                prompt=self.encoder.prompt,
            )
            self.progress.general_end(self.results["general"][str(stage)])

    def finish(self) -> None:
        metrics = compute_cl_metrics(self.results["matrix"], self.results["eval_sizes"])
        gp_ip = {"GP": None, "IP": None}
        if self.general_eval:
            gp_ip = self.general_eval.aggregate_gp_ip(self.results["general"], self.cfg.general_eval, final_stage=len(self.tasks))
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

"""The stage loop: the only place that knows the order of a stage (shared/DESIGN.md §1)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from . import config as config_checks
from .data import TrainingEncoder
from .evaluation import evaluate_task
from .errors import CLBenchError, ConfigError
from .faults import kill_point
from .initializers.base import InitContext
from .jobs import Job, Requeued, job_scope
from .metrics import compute_cl_metrics
from .models import load_model, model_unavailable, resolve_device, resolve_model_path
from .results import SCHEMA, atomic_save_tensors, atomic_write_json, load_tensors, package_versions, write_jsonl
from .run_dir import (
    RunLock, StageFiles, factors_to_tensors, load_checkpoint, load_model_state, load_previous_results,
    save_checkpoint, save_model_state,
)
from .summary import format_summary
from .tasks import load_sequence
from .tracking import make_tracker
from .training import steps_per_stage, train_stage

log = logging.getLogger("cl_bench")


def lora_scaling(lora_cfg) -> float:
    r, alpha = int(lora_cfg.r), float(lora_cfg.alpha)
    return alpha / r ** 0.5 if lora_cfg.scaling == "rslora" else alpha / r


def build_plugins(cfg):
    """Instantiate initializer, regularizer and merge from their `_target_` (validates kwargs)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    plugins = []
    for group in ("initializer", "regularizer", "merge"):
        try:
            plugins.append(instantiate(cfg[group]))
        except InstantiationException as exc:
            # Hydra wraps the plug-in's own one-line ConfigError; surface that, not the wrapper.
            if isinstance(exc.__cause__, CLBenchError):
                raise exc.__cause__ from None
            raise ConfigError(f"{group}: cannot build {cfg[group].get('_target_')!r}: {str(exc).splitlines()[-1]}") from None
    return tuple(plugins)


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
        self.initializer, self.regularizer, self.merger = build_plugins(cfg)
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
            "config": self.config, "versions": package_versions(), "complete": False, "status": "running",
        }

    def save(self) -> None:
        atomic_write_json(self.run_dir / "results.json", self.results)

    # ---- the run ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.prepare()
        with RunLock(self.run_dir):
            previous = load_previous_results(self.run_dir, self.config)
            if previous and previous.get("complete"):
                log.info("run in %s is already complete; not redoing it", self.run_dir)
                self.results = previous
                print(format_summary(previous))
                return previous
            self.results = previous or self.new_results()
            try:
                self._run_stages()
            except BaseException as exc:
                self.results["status"] = f"failed: {type(exc).__name__}: {exc}"
                self.results["complete"] = False
                self.save()
                raise
        print(format_summary(self.results))
        return self.results

    def _run_stages(self) -> None:
        cfg = self.cfg
        self.model, self.tokenizer = load_model(cfg.model, self.device, str(cfg.cache.dir), log=log.info)
        self.tracker = make_tracker(cfg.logger, self.results, self.run_dir)
        self.job.on_exit(lambda exc: self.tracker.close(exit_code=1, preempted=isinstance(exc, Requeued)))
        tr, ev = cfg.trainer, cfg.evaluation
        # Never feed more positions than the model has (the tiny model has 512).
        max_pos = getattr(self.model.config, "max_position_embeddings", None) or 10**9
        self.max_prompt_len = min(int(ev.max_prompt_len), max_pos - int(ev.max_new_tokens))
        self.encoder = TrainingEncoder(self.tokenizer, min(int(tr.max_len), max_pos), bool(tr.mask_prompt), bool(ev.use_chat_template))
        self.targets = list(cfg.lora.target_modules)
        done = len(self.results["stages"])
        if done:
            log.info("resuming after stage %d of %d", done, len(self.tasks))
            load_model_state(StageFiles(self.run_dir, done), self.model, self.targets)
            reg_file = StageFiles(self.run_dir, done).regularizer
            if reg_file.exists():
                self.regularizer.load_state_dict(load_tensors(reg_file))
        if self.results["matrix"][0][0] is None:
            self.evaluate_row(0)
            self.save()
            self.tracker.log_stage(0, self.results)
        for stage in range(done + 1, len(self.tasks) + 1):
            self.run_stage(stage)
        self.finish()

    def run_stage(self, stage: int) -> None:
        cfg, task = self.cfg, self.tasks[stage - 1]
        files = StageFiles(self.run_dir, stage)
        seconds: dict[str, float] = {}
        if files.model_state.exists():  # trained and merged before a crash during evaluation
            load_model_state(files, self.model, self.targets)
            record = _read_json(files.dir / "stage.json")
        else:
            record = self.train_stage(stage, task, files, seconds)
        t0 = time.time()
        self.evaluate_row(stage)
        record["seconds"]["eval"] = time.time() - t0
        self.results["stages"].append(record)
        self.save()
        self.tracker.log_stage(stage, self.results)
        kill_point(f"saved:{stage}")
        # Only the latest model state is needed to resume; older ones would cost a model each.
        if stage > 1:
            StageFiles(self.run_dir, stage - 1).model_state.unlink(missing_ok=True)
        log.info("stage %d/%d (%s) done: row %s", stage, len(self.tasks), task.name,
                 [None if v is None else round(v, 1) for v in self.results["matrix"][stage]])
        self.job.safe_point()  # stage saved: a pending preemption requeues here

    def train_stage(self, stage: int, task, files: StageFiles, seconds: dict[str, float]) -> dict[str, Any]:
        from peft import LoraConfig, get_peft_model

        cfg = self.cfg
        stage_seed = int(cfg.seed) * 1000 + stage
        torch.manual_seed(stage_seed)
        ctx = InitContext(
            stage=stage, current=task, previous=self.tasks[: stage - 1], rank=int(cfg.lora.r),
            alpha=float(cfg.lora.alpha), scaling=lora_scaling(cfg.lora), target_modules=self.targets,
            device=self.device, seed=stage_seed,
            make_batches=lambda t, n, bs, seed: self.encoder.batches(t, n, bs, seed, self.device),
            cache_dir=self.init_cache_dir, log=log.info,
        )
        t0 = time.time()
        lora_config = LoraConfig(
            r=int(cfg.lora.r), lora_alpha=float(cfg.lora.alpha), lora_dropout=float(cfg.lora.dropout),
            target_modules=self.targets, use_rslora=cfg.lora.scaling == "rslora", task_type="CAUSAL_LM",
            **self.initializer.lora_config_kwargs(),
        )
        self.initializer.before_wrap(self.model, lora_config, ctx)
        peft_model = get_peft_model(self.model, lora_config)
        init_result = self.initializer.init(peft_model, ctx)
        if init_result.factors:
            from .initializers.apply import apply_init

            init_result.stats["apply"] = apply_init(peft_model, init_result)
        seconds["init"] = time.time() - t0

        self.regularizer.begin_stage(peft_model, stage, task)
        tr = OmegaConf.to_container(cfg.trainer, resolve=True)
        tr["total_steps"] = steps_per_stage(len(task.train), cfg.trainer)
        resumed = load_checkpoint(files, peft_model)
        every = int(tr.get("checkpoint_every_steps") or 0)
        if self.job.preemptible:  # visit every step boundary: a preemption signal saves there
            tr["checkpoint_every_steps"] = 1

        def checkpoint(st, opt, sch):
            save = lambda: save_checkpoint(files, peft_model, st, opt, sch)  # noqa: E731
            if every and st.step % every == 0:
                save()
                save = None
            self.job.safe_point(save)
        if resumed:
            log.info("stage %d: resuming training at step %d", stage, resumed[0].step)
        t0 = time.time()
        train_summary = train_stage(
            peft_model, task, self.encoder, OmegaConf.create(tr), self.regularizer, device=self.device,
            seed=stage_seed, state=resumed[0] if resumed else None, optimizer_state=resumed[1] if resumed else None,
            checkpoint=checkpoint,
            progress=bool(cfg.progress), log=log.info,
            on_step=lambda step, terms: (self.tracker.log_step(stage, step, terms), kill_point(f"train:{stage}:{step}")),
        )
        seconds["train"] = time.time() - t0
        self.regularizer.end_stage(peft_model, stage, task)

        self.model, trained = self.merger.merge(peft_model)
        atomic_save_tensors(files.adapter, factors_to_tensors(trained))
        if init_result.factors and init_result.absorb:
            atomic_save_tensors(files.init, factors_to_tensors(init_result.factors))
        reg_state = self.regularizer.state_dict()
        if reg_state:
            atomic_save_tensors(files.regularizer, reg_state)
        record = {
            "stage": stage, "task": task.name, "init": init_result.stats or {"method": self.initializer.name},
            "train": train_summary, "seconds": seconds,
        }
        atomic_write_json(files.dir / "stage.json", record)
        save_model_state(files, self.model, self.targets)  # marks "trained": eval may now be redone alone
        _remove_tree(files.checkpoint)
        return record

    def evaluate_row(self, stage: int) -> None:
        cfg = self.cfg
        ev = cfg.evaluation
        row = self.results["matrix"][stage]
        for j, task in enumerate(self.tasks):
            if not ev.full_matrix and stage and j >= stage:
                continue
            score, records = evaluate_task(
                self.model, self.tokenizer, task, batch_size=int(ev.batch_size), max_new_tokens=int(ev.max_new_tokens),
                max_prompt_len=self.max_prompt_len, device=self.device, use_chat_template=bool(ev.use_chat_template),
                limit=ev.limit, progress=bool(cfg.progress),
            )
            row[j] = score
            write_jsonl(self.run_dir / "predictions" / f"stage_{stage:02d}" / f"{task.name}.jsonl", records)
            kill_point(f"eval:{stage}:{j}")
        if self.general_eval and self.general_eval.should_run(cfg.general_eval, stage, len(self.tasks)):
            self.results["general"][str(stage)] = self.general_eval.evaluate_general(
                self.model, self.tokenizer, cfg.general_eval, data_root=cfg.data.get("root"),
                work_dir=str(self.run_dir / "general_eval"), device=self.device, seed=int(cfg.seed),
            )

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


def run(cfg, run_dir: str | Path) -> dict[str, Any]:
    with job_scope(int(cfg.seed)) as job:  # nothing leaks into the next job of this process
        return Runner(cfg, Path(run_dir), job).run()

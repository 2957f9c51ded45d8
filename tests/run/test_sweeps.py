"""Sweeps: every preset and group choice composes; the SLURM preset renders its sbatch script;
jobs of one process do not leak into each other; a preempted submitit job requeues itself into
the same run dir, resumes and gets the uninterrupted matrix, continuing its offline W&B run;
the shared plots write readable PNGs."""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hydra.experimental.callback import Callback

from cl_bench.infra.jobs import Job, Requeued
from cl_bench.report import figures as plots
from cl_bench.run.config import validate
from cl_bench.run.tracking import run_id
from helpers import FAST, REPO, compose

CONF = REPO / "conf"
# The two jobs the multirun tests share; the second is also run alone, as the reference.
JOB_ARGS = FAST + ["sequence=synthetic_conflict", "sequence.tasks=[sentiment,parity]", "threads=1"]
REFERENCE_METHOD = "vanilla"


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# --------------------------------------------------------------------------- composition
def test_every_group_choice_and_preset_composes_and_validates():
    """Every YAML of every group, in as few compositions as cover them all (choice k of every
    group together), then every experiment preset with a method preset, and the launchers."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    groups = {p.name: _choices(p.name) for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment")}
    groups["experiment"] = _choices("experiment")
    groups["experiment/method"] = _choices("experiment/method")
    n = max(len(c) for c in groups.values())
    cases = [[f"{g}={c[k % len(c)]}" for g, c in groups.items()] for k in range(n)]
    assert n >= 20 and {"slice_paper", "ps_lora_paper", "debug"} <= set(groups["experiment"])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for overrides in cases:
            validate(hydra_compose(config_name="config", overrides=overrides))
        for launcher in _choices("hydra/launcher"):
            cfg = hydra_compose(
                config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True
            )
            assert cfg.hydra.launcher._target_.startswith("hydra_plugins.hydra_submitit_launcher")


def test_presets_carry_the_papers_settings():
    s = compose(["experiment=slice_paper", "experiment/method=slice_c075"])
    assert (s.lora.r, s.lora.alpha, s.lora.scaling, s.lora.dropout) == (64, 2, "rslora", 0.0)
    assert (s.trainer.lr, s.trainer.epochs, s.trainer.warmup_ratio, s.trainer.batch_size, s.trainer.grad_accum) == (
        1e-4,
        3,
        0.01,
        16,
        2,
    )
    assert (s.evaluation.limit, s.trainer.max_len, s.evaluation.max_prompt_len) == (64, 256, 512)
    assert s.model.name_or_path == "meta-llama/Llama-3.2-3B-Instruct" and "hellaswag" in s.general_eval.benchmarks
    assert s.initializer._target_.endswith(".Slice") and s.initializer.c == 0.75
    p = compose(["experiment=ps_lora_paper"])
    assert (p.lora.r, p.lora.alpha, p.lora.scaling, list(p.lora.target_modules)) == (
        8,
        8,
        "standard",
        ["q_proj", "v_proj"],
    )
    assert (p.trainer.lr, p.trainer.batch_size, p.trainer.epochs, p.lora.dropout) == (3e-4, 4, 1, 0.1)
    assert p.regularizer._target_.endswith(".PSLoss") and (p.regularizer.lam, p.regularizer.terms) == (0.001, "both")
    assert p.merge._target_.endswith(".MagMax") and p.merge.train_on == "sum"  # Algorithm 1
    d = compose(["experiment=debug"])
    assert (d.model.builder, d.trainer.epochs, d.evaluation.limit) == ("tiny", 1, 8)


def test_multirun_yaml_and_the_named_sweeps_hold_the_papers_grids():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    methods = "vanilla,loram,lora_ga,slice_c050,slice_c075,slice_c100"

    def sweep(*overrides):  # as `--config-dir . --config-name multirun`: the repo root plus conf/
        return hydra_compose(
            config_name="multirun",
            return_hydra_config=True,
            overrides=[f"hydra.searchpath=[file://{CONF}]", *overrides],
        )

    with initialize_config_dir(config_dir=str(REPO), version_base="1.3"):
        main, alpha = sweep(), sweep("experiment=slice_alpha")
        r128, tiny = sweep("experiment=slice_rank128"), sweep("experiment=tiny_sweep")
    assert dict(main.hydra.sweeper.params) == {
        "experiment/method": methods,
        "sequence": "ni_g1,ni_g2,trace,ni_opp1,ni_opp2,ni_opp3",
        "seed": "42,43,44",
    }
    assert (main.lora.r, main.lora.alpha, main.model.name_or_path) == (64, 2, "meta-llama/Llama-3.2-3B-Instruct")
    assert dict(alpha.hydra.sweeper.params) == {
        "experiment/method": "lora_ga,slice_c050",
        "sequence": "ni_g2,ni_opp3,trace",
        "lora.alpha": "1,2,4",
        "seed": "42,43,44",
    }
    assert r128.lora.r == 128 and r128.hydra.sweeper.params["experiment/method"] == methods
    assert tiny.model.builder == "tiny" and tiny.hydra.sweeper.params["experiment/method"] == methods
    assert tiny.hydra.sweeper.params["sequence"] == "synthetic,synthetic_conflict"


def test_slurm_preset_resolves_and_renders_the_sbatch_script(tmp_path, monkeypatch):
    """What `hydra/launcher=slurm` would submit (srun is absent here: a stub lets submitit build
    its executor; nothing is submitted): the launcher's params, passed to submitit exactly as
    hydra-submitit-launcher does, rendered as the sbatch script."""
    import submitit
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.utils import setup_globals
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    setup_globals()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(
            config_name="config",
            return_hydra_config=True,
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.cpus_per_task=6",
                "hydra.launcher.timeout_min=90",
                "+hydra.launcher.additional_parameters.account=proj42",
                "hydra.launcher.nodes=2",
                "hydra.launcher.tasks_per_node=4",
                "hydra.launcher.gpus_per_node=4",  # distributed=ddp
                f"hydra.sweep.dir={tmp_path}",
                "hydra.job.name=cl_bench",
            ],
        )
    stub = tmp_path / "bin" / "srun"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 1\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}{os.pathsep}{os.environ['PATH']}")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert dict(cfg.hydra.job.env_set) == {"CL_BENCH_THREADS": "6", "CL_BENCH_SIGNAL_DELAY_S": "120"}
    launcher.pop("_target_")
    folder = launcher.pop("submitit_folder")
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=folder, slurm_max_num_timeout=launcher.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in launcher.items()})
    sbatch = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in (
        "--partition=gpu",
        "--cpus-per-task=6",
        "--gpus-per-node=4",
        "--time=90",
        "--mem=64GB",
        "--signal=USR2@120",
        "--requeue",
        "--account=proj42",
        "--ntasks-per-node=4",
        "--nodes=2",
    ):
        assert f"#SBATCH {line}" in sbatch, line
    assert executor._executor.max_num_timeout == 10


# --------------------------------------------------------------------------- preemption (unit)
def _fake_submitit_handler(calls: list):
    def handler(signum, frame):  # submitit: checkpoint, pickle, requeue, then sys.exit(-1)
        calls.append(signum)
        sys.exit(-1)

    return handler


def test_preemption_waits_for_the_next_safe_point_then_requeues():
    calls, saved, closed = [], [], []
    job = Job(grace_s=30).install(signal.SIGUSR1, _fake_submitit_handler(calls))
    job.on_exit(lambda exc: closed.append(type(exc).__name__))
    try:
        assert job.preemptible and not job.pending
        job.safe_point(lambda: saved.append("no signal yet"))
        assert saved == [] and calls == []
        os.kill(os.getpid(), signal.SIGUSR1)
        assert job.pending and calls == []  # deferred: the handler did not run mid-step
        with pytest.raises(Requeued) as info:
            job.safe_point(lambda: saved.append("checkpoint"))
        assert saved == ["checkpoint"] and calls == [signal.SIGUSR1] and info.value.code == -1
        assert closed == ["Requeued"]  # W&B and friends closed before the requeue
    finally:
        job.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is not job._on_signal


def test_preemption_without_a_safe_point_requeues_after_the_grace_period():
    calls = []
    job = Job(grace_s=0.05).install(signal.SIGUSR1, _fake_submitit_handler(calls))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(Requeued):
            time.sleep(5)  # a long evaluation: the grace timer fires inside it
        assert calls == [signal.SIGUSR1]
    finally:
        job.uninstall()


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def alone(tiny_model_dir, tmp_path_factory):
    """The reference job, run alone in a fresh Runner."""
    from cl_bench.run.runner import run

    run_dir = tmp_path_factory.mktemp("alone")
    run(compose(JOB_ARGS + [f"experiment/method={REFERENCE_METHOD}"]), run_dir)
    return json.loads((run_dir / "results.json").read_text())


class LeakProbe(Callback):
    """A Hydra callback: what each job of a basic-launcher multirun leaves behind."""

    seen: list[dict] = []

    def on_job_start(self, config, **kw) -> None:
        # Disturb every global RNG as a careless earlier job would: the job must reseed.
        random.seed(999)
        np.random.seed(999)
        torch.manual_seed(999)
        self.before = self._state()

    def on_job_end(self, config, job_return, **kw) -> None:
        import wandb

        LeakProbe.seen.append(
            {
                "before": self.before,
                "after": self._state(),
                "wandb_run_open": wandb.run is not None,
                "sigusr2": signal.getsignal(signal.SIGUSR2),
                "run_dir": config.hydra.runtime.output_dir,
            }
        )

    @staticmethod
    def _state() -> dict:
        from transformers import PreTrainedModel

        gc.collect()
        return {
            "models": sum(isinstance(o, PreTrainedModel) for o in gc.get_objects()),
            "root_handlers": len(logging.getLogger().handlers),
            "cl_bench_handlers": len(logging.getLogger("cl_bench").handlers),
        }


@pytest.mark.slow
def test_basic_launcher_jobs_leak_nothing_into_the_next(alone, tmp_path, monkeypatch):
    """Two jobs in one process (Hydra's basic launcher), W&B offline: each job closes its W&B
    run, frees its model, leaves logging and signals as it found them, and the second job gives
    exactly the matrix, loss curves and predictions it gives when run alone."""
    import wandb

    from cl_bench.__main__ import main

    inits = []
    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kw: (inits.append(kw), real_init(**kw))[1])
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "sweep"
    LeakProbe.seen = []
    # In process, Hydra would look for ../conf as a Python package: name the folder instead.
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "cl_bench",
            "-m",
            "--config-path",
            str(CONF),
            *JOB_ARGS,
            f"experiment/method=loram,{REFERENCE_METHOD}",
            "logger=wandb",
            f"hydra.sweep.dir={sweep}",
            "hydra/job_logging=none",
            "hydra/hydra_logging=none",
            "+hydra.callbacks.probe._target_=test_sweeps.LeakProbe",
        ],
    )
    try:
        main()
    finally:  # end this process's W&B service: the later tests' child processes must not share it
        wandb.teardown()
        os.environ.pop("WANDB_SERVICE", None)
    assert len(LeakProbe.seen) == 2
    for job in LeakProbe.seen:
        assert job["after"] == job["before"], job  # no model, handler left behind
        assert not job["wandb_run_open"] and job["sigusr2"] == signal.SIG_DFL
    # one W&B run per job: id from the run dir, the sweep as group, the method as job type
    assert [kw["id"] for kw in inits] == [run_id(sweep / "0"), run_id(sweep / "1")]
    assert {kw["group"] for kw in inits} == {"sweep"} and [kw["job_type"] for kw in inits] == [
        "loram/none/absorb",
        f"{REFERENCE_METHOD}/none/absorb",
    ]
    second = json.loads((sweep / "1" / "results.json").read_text())
    assert second["matrix"] == alone["matrix"]
    assert [s["train"]["loss_curve"] for s in second["stages"]] == [s["train"]["loss_curve"] for s in alone["stages"]]
    first = json.loads((sweep / "0" / "results.json").read_text())
    assert first["complete"] and first["config"]["initializer"]["_target_"].endswith("LoRAM")


@pytest.mark.slow
def test_preempted_local_job_requeues_into_its_run_dir_and_gets_the_same_matrix(alone, tmp_path):
    """hydra/launcher=local_jobs (submitit, a real child process): the job receives the
    preemption signal after step 3 of stage 2, writes an in-stage checkpoint at step 4, submitit
    calls the launcher's checkpoint() and restarts the pickled job; it reopens the same run dir
    (the sweep dir holds ${now:...} to the microsecond), resumes at step 4 and ends with the
    matrix and loss curves of the uninterrupted run. Its offline W&B run keeps one id."""
    env = dict(os.environ, WANDB_MODE="offline", CL_BENCH_SIGNAL_AT="train:2:3")
    cmd = [
        sys.executable,
        "-m",
        "cl_bench",
        "-m",
        *JOB_ARGS,
        f"experiment/method={REFERENCE_METHOD}",
        "hydra/launcher=local_jobs",
        "logger=wandb",
        f"hydra.sweep.dir={tmp_path}/" + "${now:%H-%M-%S-%f}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = [p for p in tmp_path.iterdir() if p.is_dir()]  # the requeued job wrote no second sweep dir
    run_dir = sweep / "0"
    final = json.loads((run_dir / "results.json").read_text())
    assert final["complete"] and final["matrix"] == alone["matrix"]
    assert [s["train"]["loss_curve"] for s in final["stages"]] == [s["train"]["loss_curve"] for s in alone["stages"]]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "in-stage checkpoint written for the requeue" in logs and "Requeued job" in logs
    assert "stage 2: resuming training at step 4" in logs
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith("-" + run_id(run_dir)) for name in offline), offline


# --------------------------------------------------------------------------- plots
RESULTS = {
    "sequence": "toy",
    "tasks": ["alpha_task", "beta_task", "gamma_task"],
    "matrix": [[10.0, 20.0, 0.0], [80.0, 25.0, 5.0], [40.0, 60.0, None], [20.0, 30.0, 90.0]],
    "metrics": {"AP": 76.6667, "FP": 46.6667, "Fgt": 30.0, "GP": None, "IP": None},
    "stages": [
        {"stage": i + 1, "task": t, "train": {"loss_curve": [2.0, 1.5, 1.0 - 0.1 * i]}}
        for i, t in enumerate(["alpha_task", "beta_task", "gamma_task"])
    ],
}


def test_relative_heatmap_values_are_percent_of_the_diagonal():
    rel = plots.relative_to_diagonal(plots._matrix(RESULTS))
    assert rel[3].tolist() == pytest.approx([25.0, 50.0, 100.0])  # 20/80, 30/60, 90/90
    assert rel[1, 0] == 100.0 and np.isnan(rel[2, 2])


def test_metric_curves_plot_mean_and_sample_std_per_knob_value():
    rows = [{"method": "slice", "alpha": a, "AP": v} for a, v in [(1, 10.0), (1, 14.0), (2, 20.0), (4, 30.0)]]
    fig = plots.metric_curves(rows, x="alpha", metrics=["AP", "FP"], hue="method")
    (ax,) = [a for a in fig.axes if a.get_visible() and a.get_title() == "AP"]
    line = ax.lines[0]
    assert line.get_xdata().tolist() == [1.0, 2.0, 4.0] and line.get_ydata().tolist() == [12.0, 20.0, 30.0]
    assert [a.get_title() for a in fig.axes if a.get_visible()] == ["AP"]  # FP has no value: no panel
    bars = [c for c in ax.collections if c.get_segments()]
    assert bars[0].get_segments()[0][:, 1].tolist() == pytest.approx([12.0 - 8**0.5, 12.0 + 8**0.5])


def test_every_plot_writes_a_png(tmp_path):
    figures = {
        "R": plots.heatmap(RESULTS),
        "R_relative": plots.heatmap(RESULTS, relative=True),
        "ap_fp": plots.stability_plasticity(
            [
                {"label": "vanilla", "AP": 76.7, "FP": 46.7},
                {"label": "slice c=0.5", "AP": 75.0, "FP": 60.0, "FP_std": 3.0},
            ]
        ),
        "alpha": plots.metric_curves(
            [{"alpha": a, "AP": 50 + a, "FP": 40 + a, "seed": s} for a in (1, 2, 4) for s in (1, 2)], x="alpha"
        ),
        "loss": plots.loss_curves(RESULTS),
    }
    for name, fig in figures.items():
        path = plots.save(fig, tmp_path / f"{name}.png")
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name

"""Run modes: multitask (one joint stage) and independent (every stage from the base
model) — their results.json shape, metrics, training budget, refusals, and resume after a crash."""

from __future__ import annotations

import json
import math

import pytest
import torch

import cl_bench.run.observers as observers_module
from cl_bench.evaluation.metrics import compute_mode_metrics
from cl_bench.infra.errors import ConfigError
from cl_bench.infra.files import load_tensors
from cl_bench.run.runner import build_plugins, run
from cl_bench.run.store import StageFiles, load_stage_record
from helpers import compose

TASKS = ["sentiment", "parity"]
SMALL = [
    "general_eval=none",
    "progress=false",
    "sequence=synthetic_conflict",
    f"sequence.tasks=[{','.join(TASKS)}]",
    "trainer.epochs=1",
    "trainer.max_steps=2",
    "trainer.batch_size=8",
    "sequence.n_train=40",
    "sequence.n_eval=4",
    "evaluation.max_new_tokens=4",
    "lora.target_modules=[q_proj,v_proj]",
]


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


# ---- metrics (pure) -----------------------------------------------------------------------------
def test_multitask_metrics_read_the_joint_row():
    R = [[10.0, 20.0, 30.0], [70.0, 80.0, 90.0]]
    m = compute_mode_metrics(R, [1, 1, 2], "multitask")
    assert m["AP"] == m["FP"] == pytest.approx(80.0)
    assert m["Acc"] == pytest.approx((70 + 80 + 2 * 90) / 4)
    assert (m["Fgt"], m["BWT"], m["FR"]) == (0.0, 0.0, 0.0)
    assert m["FWT"] is None and m["AAA"] is None


def test_independent_metrics_read_the_diagonal_not_the_last_row():
    R = [[0.0, 0.0], [60.0, 5.0], [1.0, 90.0]]  # row 2 = trained on task 2 alone: task 1's 1.0 is not "forgotten"
    m = compute_mode_metrics(R, [3, 1], "independent")
    assert m["AP"] == m["FP"] == pytest.approx(75.0)
    assert m["Acc"] == pytest.approx((3 * 60 + 90) / 4)
    assert m["Fgt"] == 0.0 and m["FWT"] is None
    assert compute_mode_metrics([[0.0, 0.0], [None, 5.0], [1.0, 90.0]], [1, 1], "independent")["AP"] is None


def test_mode_metrics_reject_a_matrix_of_the_wrong_shape():
    with pytest.raises(ValueError, match="need 2 rows"):
        compute_mode_metrics([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], [1, 1], "multitask")


# ---- refusals (no model loaded) -----------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["mode=joint"], "mode='joint' is invalid; valid: sequential, multitask, independent"),
        (["mode=multitask", "regularizer=replay"], "mode=multitask with regularizer=replay"),
        (["mode=independent", "merge=ties"], "mode=independent with merge=ties"),
        (["mode=independent", "initializer=slice"], "mode=independent with initializer=slice"),
    ],
)
def test_combinations_without_an_earlier_stage_are_refused_in_one_line(overrides, message):
    from cl_bench.run import config, modes

    cfg = compose(SMALL + overrides)
    with pytest.raises(ConfigError) as err:
        config.validate(cfg)
        plugins = build_plugins(cfg)
        modes.check_plugins(cfg.mode, plugins["initializer"], plugins["regularizer"], plugins["merge"], cfg.initializer)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_initializer_calibrated_on_previous_tasks_is_refused():
    from cl_bench.run import modes

    plugins = build_plugins(compose(SMALL))  # CorDA's knob, checked from the config alone (CorDA builds slowly)
    with pytest.raises(ConfigError, match="initializer.calibration=previous"):
        modes.check_plugins(
            "multitask", plugins["initializer"], plugins["regularizer"], plugins["merge"], {"calibration": "previous"}
        )


# ---- end to end (in process, 2 tasks, 2 steps a stage) ------------------------------------------
class Crash(Exception):
    pass


def crash_at(monkeypatch, point: str) -> None:
    """A crash at a runner kill point, in process (the SIGKILL version is tests/run/test_reliability.py)."""
    real = observers_module.kill_point

    def kill_point(p):
        if p == point:
            raise Crash(p)
        real(p)

    monkeypatch.setattr(observers_module, "kill_point", kill_point)


@pytest.fixture(scope="module")
def independent(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("independent")
    return run(compose(SMALL + ["mode=independent"]), run_dir), run_dir


def test_independent_trains_every_task_from_the_base_model(independent, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    results, run_dir = independent
    assert results["mode"] == "independent" and len(results["matrix"]) == len(TASKS) + 1
    assert all(v is not None for row in results["matrix"] for v in row)  # full rows by default
    diag = [results["matrix"][i + 1][i] for i in range(len(TASKS))]
    assert results["metrics"]["AP"] == results["metrics"]["FP"] == pytest.approx(sum(diag) / len(diag))
    # the model after stage 2 is W0 + τ_2 exactly: nothing of stage 1 carried over
    W0 = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    saved = load_tensors(StageFiles(run_dir, 2).model_state)
    record = load_stage_record(StageFiles(run_dir, 2))
    tau1 = load_stage_record(StageFiles(run_dir, 1)).task_vector(record.modules[0])
    assert float(tau1.abs().max()) > 0
    for name in record.modules:
        expected = W0[f"{name}.weight"].detach() + record.task_vector(name)
        assert torch.allclose(saved[f"{name}.weight"], expected, atol=1e-6), name


def crash_run(cfg, run_dir, monkeypatch, point: str) -> None:
    """Run `cfg` in `run_dir` until it crashes at `point`."""
    with monkeypatch.context() as m:
        crash_at(m, point)
        with pytest.raises(Crash):
            run(cfg, run_dir)


def test_independent_resumed_after_a_crash_still_starts_from_the_base_model(independent, tmp_path, monkeypatch):
    reference, _ = independent
    cfg = compose(SMALL + ["mode=independent"])
    crash_run(cfg, tmp_path, monkeypatch, "saved:1")
    partial = json.loads((tmp_path / "results.json").read_text())
    assert len(partial["stages"]) == 1 and partial["complete"] is False  # stage 1 kept
    resumed = run(cfg, tmp_path)  # a fresh model holding stage 1's state must go back to W0 for stage 2
    assert resumed["matrix"] == reference["matrix"]
    assert [s["train"]["loss_curve"] for s in resumed["stages"]] == [
        s["train"]["loss_curve"] for s in reference["stages"]
    ]


@pytest.fixture(scope="module")
def multitask(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("multitask")
    return run(compose(SMALL + ["mode=multitask"]), run_dir), run_dir


def test_multitask_is_one_joint_stage_with_the_sequential_budget(multitask):
    results, _ = multitask
    assert results["mode"] == "multitask" and len(results["matrix"]) == 2
    assert all(v is not None for row in results["matrix"] for v in row)
    [stage] = results["stages"]
    assert stage["task"] == "multitask" and stage["tasks"] == TASKS
    n_train = sum(results["split_stats"][t]["train"] for t in TASKS)
    assert stage["train"]["examples"] == n_train
    # 1 epoch over the union (ceil(n/8) steps) capped at max_steps x T = 4
    assert stage["train"]["steps"] == min(math.ceil(n_train / 8), 2 * len(TASKS)) == 4
    assert results["metrics"]["FP"] == pytest.approx(sum(results["matrix"][1]) / len(TASKS))


def test_multitask_crash_during_evaluation_keeps_the_trained_stage(multitask, tmp_path, monkeypatch):
    reference, _ = multitask
    cfg = compose(SMALL + ["mode=multitask"])
    crash_run(cfg, tmp_path, monkeypatch, "eval:1:0")
    assert StageFiles(tmp_path, 1).model_state.exists()
    resumed = run(cfg, tmp_path)  # only the evaluation is redone
    assert resumed["matrix"] == reference["matrix"]
    assert resumed["stages"][0]["train"]["loss_curve"] == reference["stages"][0]["train"]["loss_curve"]


def test_the_slice_claim_presets_hold_the_issue_grid():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from helpers import REPO

    def sweep(name):  # as `--config-dir . --config-name multirun experiment=<name>`
        return hydra_compose(
            config_name="multirun",
            return_hydra_config=True,
            overrides=[f"hydra.searchpath=[file://{REPO / 'conf'}]", f"experiment={name}"],
        )

    with initialize_config_dir(config_dir=str(REPO), version_base="1.3"):
        main, alpha = sweep("slice_claim"), sweep("slice_claim_alpha")
    assert dict(main.hydra.sweeper.params) == {
        "experiment/method": "vanilla,loram,lora_ga,slice_c050,slice_c075,slice_c100,replay,multitask",
        "sequence": "synthetic_conflict,synthetic",
        "seed": "42,43,44",
    }
    assert dict(alpha.hydra.sweeper.params) == {
        **main.hydra.sweeper.params,
        "experiment/method": "slice_c050",
        "lora.alpha": "1,2,4",
    }
    assert (
        main.model.builder == "tiny" and main.hydra.sweep.dir == "multirun/slice_claim/main"
    )  # the embedded defaults, resumable
    assert compose(["experiment/method=multitask"]).mode == "multitask"
    assert compose(["experiment/method=replay"]).regularizer._target_.endswith(".Replay")

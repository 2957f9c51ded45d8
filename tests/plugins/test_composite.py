"""Several regularizers in one run (`regularizer=[a,b]`): the config rewrite, the refusals, the
hooks and terms of the parts, the report's label, and end to end from the command line with a
kill -9 mid-stage-2 resume that restores every part's state."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from cl_bench.infra.errors import ConfigError
from cl_bench.regularizers.composite import Composite, normalize_config
from cl_bench.regularizers.o_lora import OLoRA
from cl_bench.regularizers.ps_loss import PSLoss
from cl_bench.regularizers.replay import Replay
from cl_bench.report.labels import method_of
from cl_bench.run.runner import build_plugins

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def _compose(overrides):
    from helpers import compose

    return compose(overrides)


def test_a_list_selection_becomes_one_composite_node_with_each_key_at_its_part():
    cfg = _compose(["regularizer=[ps_loss,o_lora]", "regularizer.lambda_1=5.0", "regularizer.lam=0.01"])
    normalize_config(cfg)
    node = OmegaConf.to_container(cfg.regularizer)
    assert node == {
        "_target_": "cl_bench.regularizers.composite.Composite",
        "parts": {
            "ps_loss": {
                "_target_": "cl_bench.regularizers.ps_loss.PSLoss",
                "lam": 0.01,
                "temperature": 1000.0,
                "terms": "both",
            },
            "o_lora": {
                "_target_": "cl_bench.regularizers.o_lora.OLoRA",
                "lambda_1": 5.0,
                "lambda_2": 0.0,
                "norm": "abs",
            },
        },
    }
    normalize_config(cfg)  # idempotent
    assert OmegaConf.to_container(cfg.regularizer) == node
    reg = build_plugins(cfg)["regularizer"]
    assert isinstance(reg, Composite) and reg.name == "ps_loss+o_lora" and list(reg.parts) == ["ps_loss", "o_lora"]
    assert reg.parts["o_lora"].lambda_1 == 5.0 and reg.parts["ps_loss"].lam == 0.01
    assert method_of({"initializer": {"_target_": "x.Vanilla"}, "regularizer": node}) == "Vanilla+PSLoss+OLoRA"
    single = _compose(["regularizer=o_lora"])
    normalize_config(single)  # one regularizer: the node it always was
    assert "_parts_" not in single.regularizer and single.regularizer._target_.endswith("OLoRA")
    assert (
        method_of({"initializer": {"_target_": "x.Vanilla"}, "regularizer": dict(single.regularizer)})
        == "Vanilla+OLoRA"
    )


@pytest.mark.parametrize(
    "selection,message",
    [
        (["regularizer=[ewc,ps_loss]"], r"ewc and ps_loss both take 'lam'"),
        (["regularizer=[o_lora,inflora]"], r"o_lora and inflora both re-set the stage's starting A"),
        (["regularizer=[gpm,o_lora]"], r"gpm and o_lora both re-set"),
        (["regularizer=[gpm,replay]", "+regularizer.foo=1"], r"no part takes regularizer.foo"),
    ],
)
def test_combinations_that_cannot_compose_are_one_line_errors(selection, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_plugins(_compose(selection))
    assert "\n" not in str(info.value)


def test_gpm_without_its_projected_start_composes_with_o_lora_which_begins_first():
    reg = build_plugins(_compose(["regularizer=[gpm,o_lora]", "regularizer.project_init=false"]))["regularizer"]
    assert reg.order == ["o_lora", "gpm"]  # the part that may re-set A begins before GPM pins A·M


def test_the_composite_adds_every_parts_terms_by_name_and_prefixes_their_state(tmp_path):
    from plugins.test_regularizers import _ctx, _history, _modules, _nudge, _wrapped

    from cl_bench.run.store import load_plugin_state, save_plugin_state

    model = _wrapped()
    history = _history(list(_modules(model)))
    ctx = _ctx(history)
    alone = {"ps_loss": PSLoss(lam=0.1, temperature=3.0), "o_lora": OLoRA(lambda_1=0.5, lambda_2=0.1)}
    both = Composite({"ps_loss": PSLoss(lam=0.1, temperature=3.0), "o_lora": OLoRA(lambda_1=0.5, lambda_2=0.1)})
    for reg in (*alone.values(), both):
        reg.begin_stage(model, ctx)
    _nudge(model)
    expected = {k: float(v.detach()) for reg in alone.values() for k, v in reg.loss(model, {}, ctx).items()}
    got = {k: float(v.detach()) for k, v in both.loss(model, {}, ctx).items()}
    assert set(got) == {"ps_loss", "orth", "l2"} and got == pytest.approx(expected, rel=1e-6)
    replay = Composite({"replay": Replay(buffer_size=3), "o_lora": OLoRA()})
    replay.load_state_dict({"replay/buffers": {"a": [4, 1, 7]}})
    save_plugin_state(tmp_path / "r.safetensors", replay.state_dict())
    state = load_plugin_state(tmp_path / "r.safetensors")
    assert state == {"replay/buffers": {"a": [4, 1, 7]}}
    fresh = Composite({"replay": Replay(buffer_size=3), "o_lora": OLoRA()})
    fresh.load_state_dict(state)
    assert fresh.parts["replay"].buffers == {"a": [4, 1, 7]}
    assert replay.adds_loss_terms() and not Composite({"replay": Replay(), "x": Replay()}).adds_loss_terms()


# ------------------------------------------------------------------ end to end, from the command line
E2E = [
    "general_eval=none",
    "progress=false",
    "threads=1",
    "sequence=synthetic_conflict",
    "sequence.tasks=[sentiment,parity]",
    "sequence.n_train=48",
    "sequence.n_eval=4",
    "evaluation.max_new_tokens=6",
    "trainer.max_steps=4",
    "trainer.checkpoint_every_steps=2",
]
EWC_REPLAY = E2E + ["regularizer=[ewc,replay]", "regularizer.fisher_samples=8"]


@pytest.mark.slow
def test_ps_loss_with_o_lora_from_the_command_line_logs_both_terms_and_the_report_names_both(
    tiny_model_dir, tmp_path, capsys
):
    from cl_bench.report.cli import main
    from helpers import run_cli

    done = run_cli(E2E + ["regularizer=[ps_loss,o_lora]", f"hydra.run.dir={tmp_path / 'run'}"])
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["regularizer"]["_target_"].endswith("Composite")
    for stage in results["stages"]:
        assert {"ps_loss", "orth"} <= set(stage["train"]["loss_last"])  # every term logged by name, every stage
    assert results["stages"][1]["train"]["loss_last"]["orth"] > 0
    assert main([str(tmp_path / "run")]) == 0
    assert "Vanilla+PSLoss+OLoRA" in capsys.readouterr().out


@pytest.mark.slow
def test_ewc_with_replay_resumes_after_sigkill_mid_stage_2_with_every_parts_state(tiny_model_dir, tmp_path):
    from cl_bench.infra.files import load_tensors
    from cl_bench.run.runner import run
    from cl_bench.run.store import load_plugin_state
    from helpers import compose, run_cli

    threads = torch.get_num_threads()
    try:
        reference = json.loads(json.dumps(run(compose(EWC_REPLAY), tmp_path / "ref")))
        killed = run_cli(
            EWC_REPLAY + [f"hydra.run.dir={tmp_path / 'killed'}"], env_extra={"CL_BENCH_KILL_AT": "train:2:2"}
        )
        assert killed.returncode == -9, killed.stderr[-2000:]
        checkpoint = load_plugin_state(
            tmp_path / "killed" / "stages" / "stage_02" / "checkpoint" / "regularizer.safetensors"
        )
        assert checkpoint["replay/buffers"] and any(k.startswith("ewc/fisher/") for k in checkpoint)
        resumed = json.loads(json.dumps(run(compose(EWC_REPLAY), tmp_path / "killed")))
    finally:
        torch.set_num_threads(threads)
    assert resumed["matrix"] == reference["matrix"]
    assert [s["train"]["loss_curve"] for s in resumed["stages"]] == [
        s["train"]["loss_curve"] for s in reference["stages"]
    ]
    assert resumed["stages"][1]["train"]["loss_last"]["ewc"] == reference["stages"][1]["train"]["loss_last"]["ewc"] > 0
    ours = load_plugin_state(tmp_path / "killed" / "stages" / "stage_02" / "regularizer.safetensors")
    ref = load_plugin_state(tmp_path / "ref" / "stages" / "stage_02" / "regularizer.safetensors")
    assert ours["ewc/tasks"] == ref["ewc/tasks"] == ["sentiment", "parity"]
    assert ours["replay/buffers"] == ref["replay/buffers"] and set(ours["replay/buffers"]) == {"sentiment", "parity"}
    tensors, ref_tensors = (
        load_tensors(d / "stages" / "stage_02" / "regularizer.safetensors")
        for d in (tmp_path / "killed", tmp_path / "ref")
    )
    assert tensors.keys() == ref_tensors.keys() and all(torch.equal(tensors[k], ref_tensors[k]) for k in ref_tensors)


def test_a_key_of_a_list_selection_is_checked_against_every_part_before_hydra():
    from cl_bench.run.config import check_group_overrides

    check_group_overrides(["regularizer=[ewc,replay]", "regularizer.fisher_samples=8", "regularizer.buffer_size=0.1"])
    with pytest.raises(ConfigError, match=r"regularizer.temperature is not a key of any of regularizer=\[ewc,replay\]"):
        check_group_overrides(["regularizer=[ewc,replay]", "regularizer.temperature=2"])

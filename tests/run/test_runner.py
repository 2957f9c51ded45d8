"""End to end on the tiny model: the results.json contract and the run-dir files."""

import json

import pytest

from cl_bench.run.runner import run
from helpers import FAST, compose

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose(FAST + ["sequence=synthetic_conflict", "sequence.tasks=[sentiment,parity,sentiment_flip]"])
    results = run(cfg, run_dir)
    return run_dir, results


def test_results_json_contract(finished_run):
    run_dir, results = finished_run
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["schema"] == 1 and on_disk["sequence"] == "synthetic_conflict"
    assert on_disk["tasks"] == ["sentiment", "parity", "sentiment_flip"]
    matrix = on_disk["matrix"]
    assert len(matrix) == 4 and all(len(row) == 3 for row in matrix)
    assert all(v is not None and 0.0 <= v <= 100.0 for row in matrix for v in row)  # full rows
    assert set(on_disk["metrics"]) >= {"AP", "FP", "Fgt", "BWT", "FWT", "FR", "Acc", "AAA", "GP", "IP"}
    assert on_disk["metrics"]["FWT"] is not None  # needs row 0 and the upper triangle
    assert on_disk["metrics"]["AP"] == pytest.approx(sum(matrix[i][i - 1] for i in (1, 2, 3)) / 3)
    assert [s["stage"] for s in on_disk["stages"]] == [1, 2, 3]
    for s in on_disk["stages"]:
        assert set(s["seconds"]) == {"init", "train", "end_stage", "merge", "eval"} and s["init"]["method"] == "vanilla"
        assert s["train"]["steps"] == 6 and len(s["train"]["loss_curve"]) == 6
    assert on_disk["config"]["lora"]["scaling"] == "rslora"
    # scoring protocol, the metric of every task, and the prompt policy are recorded
    assert on_disk["evaluation"] == {"protocol": "per_task", "metrics": {t: "accuracy" for t in on_disk["tasks"]}}
    assert on_disk["config"]["evaluation"]["prompt"] == {
        "format": "chat_template",
        "system": None,
        "date_string": "26 Jul 2024",
    }
    assert on_disk["split_stats"] == {t: {"train": 48, "eval": 8, "dropped_duplicates": 0} for t in on_disk["tasks"]}
    assert on_disk["versions"]["torch"] and on_disk["versions"]["peft"]
    assert on_disk["complete"] is True


def test_predictions_and_adapters_written(finished_run):
    run_dir, results = finished_run
    for stage in range(4):
        for task in results["tasks"]:
            lines = (run_dir / "predictions" / f"stage_{stage:02d}" / f"{task}.jsonl").read_text().splitlines()
            assert len(lines) == 8
            rec = json.loads(lines[0])
            assert set(rec) >= {"prompt", "target", "prediction", "score"}
    from safetensors.torch import load_file

    adapter = load_file(str(run_dir / "stages" / "stage_02" / "adapter.safetensors"))
    assert any(k.endswith(".A") for k in adapter) and any(k.endswith(".B") for k in adapter)
    # Only the latest merged model state is kept.
    assert (run_dir / "stages" / "stage_03" / "model_state.safetensors").exists()
    assert not (run_dir / "stages" / "stage_01" / "model_state.safetensors").exists()


def test_rerun_of_a_finished_run_is_not_redone(finished_run, capsys):
    run_dir, results = finished_run
    cfg = compose(FAST + ["sequence=synthetic_conflict", "sequence.tasks=[sentiment,parity,sentiment_flip]"])
    again = run(cfg, run_dir)
    assert again["matrix"] == json.loads(json.dumps(results["matrix"]))
    assert "results matrix" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, message",
    [
        ("evaluation.protocol=paper", "evaluation.protocol='paper' is invalid; valid: per_task, slice_paper"),
        (
            "evaluation.prompt.format=llama",
            "evaluation.prompt.format='llama' is invalid; valid: chat_template, slice_paper",
        ),
        ("evaluation.prompt.date_string=2024-07-26", "evaluation.prompt.date_string='2024-07-26' is invalid"),
        ("+evaluation.prompt.today=1", "evaluation.prompt.today is not a known key"),
        ("evaluation.use_chat_template=false evaluation.prompt.system=hi", "evaluation.prompt.system is set but"),
    ],
)
def test_bad_protocol_or_prompt_is_a_one_line_config_error(override, message):
    from cl_bench.infra.errors import ConfigError
    from cl_bench.run import config

    with pytest.raises(ConfigError) as info:
        config.validate(compose(override.split()))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_standard_scaling_is_one_config_field(tiny_model_dir, tmp_path):
    from cl_bench.lora.layers import lora_scaling

    lora = compose(["lora.r=4", "lora.alpha=8", "lora.scaling=standard"]).lora
    assert lora_scaling(lora.alpha, lora.r, lora.scaling) == pytest.approx(2.0)
    lora = compose(["lora.r=4", "lora.alpha=8"]).lora
    assert lora_scaling(lora.alpha, lora.r, lora.scaling) == pytest.approx(4.0)

"""Every merge end to end on synthetic_conflict (tiny model, in process, shared runs), PS-LoRA's
magmax across kill -9 and an evaluation crash, and `python -m cl_bench.remerge`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cl_bench.infra.files import load_tensors
from cl_bench.lora import task_vectors as merges
from cl_bench.remerge import main as remerge_main
from cl_bench.run.runner import run
from cl_bench.run.store import StageFiles, load_plugin_state, load_stage_record
from helpers import FAST, compose, run_cli

pytestmark = pytest.mark.slow

# threads=1 in process and in the CLI runs: the same arithmetic, so matrices compare exactly.
ARGS = FAST + [
    "sequence=synthetic_conflict",
    "sequence.tasks=[sentiment,sentiment_flip]",
    "trainer.max_steps=4",
    "trainer.checkpoint_every_steps=2",
    "threads=1",
]
MERGES = {
    "absorb": ["merge=absorb"],
    "task_arithmetic": ["merge=task_arithmetic", "merge.lam=0.5"],
    "average": ["merge=average"],
    "ties": ["merge=ties"],
    "dare": ["merge=dare"],
    "magmax": ["merge=magmax"],
    "ties_merged": ["merge=ties", "merge.train_on=merged"],
}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    threads = torch.get_num_threads()
    out = {}
    for name, overrides in MERGES.items():
        run_dir = tmp_path_factory.mktemp(name)
        out[name] = (run_dir, run(compose(ARGS + overrides), run_dir))
    torch.set_num_threads(threads)
    return out


def _curves(results):
    return [s["train"]["loss_curve"] for s in results["stages"]]


def test_every_merge_completes_with_its_state(runs):
    for name, (run_dir, results) in runs.items():
        assert results["complete"], name
        assert all(v is not None for row in results["matrix"] for v in row), name
        state = run_dir / "stages" / "stage_02" / "merge.safetensors"
        if name == "absorb":
            assert not state.exists()  # absorb needs nothing beyond the folded weights
        else:
            saved = load_plugin_state(state)
            assert saved["stages"] == 2 and saved["train_on"] == ("merged" if name == "ties_merged" else "sum")
            assert saved["merged_sq_norm"] > 0


def test_post_hoc_merges_train_exactly_as_absorb(runs):
    """train_on=sum (every merge's default): same train model as absorb, only the evaluated one differs."""
    ref_dir, ref = runs["absorb"]
    ref_state = load_tensors(StageFiles(ref_dir, 2).model_state)
    for name in ("task_arithmetic", "average", "ties", "dare", "magmax"):
        run_dir, results = runs[name]
        assert _curves(results) == _curves(ref), name
        state = load_tensors(StageFiles(run_dir, 2).model_state)
        assert all(torch.equal(state[k], ref_state[k]) for k in ref_state), name
    # after one stage, average and magmax of τ_1 are τ_1 itself: the same eval model, the same row
    for name in ("average", "magmax"):
        assert runs[name][1]["matrix"][1] == ref["matrix"][1]


def test_merged_ties_trains_the_next_stage_on_the_ties_model(runs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    """The model after stage 2 (the one stage 3 trains on) is W0 + TIES(τ1, τ2); stage 2 itself trained
    on W0 + τ1 as under absorb: a merge of one task vector is the identity."""
    run_dir, results = runs["ties_merged"]
    ref = runs["absorb"][1]
    assert _curves(results) == _curves(ref)
    history = [load_stage_record(StageFiles(run_dir, s)) for s in (1, 2)]
    w0 = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    state = load_tensors(StageFiles(run_dir, 2).model_state)
    for module in history[0].modules[:4]:
        taus = [r.task_vector(module) for r in history]
        expected = w0[f"{module}.weight"].detach() + merges.ties(taus, density=0.2)  # the yaml's density
        torch.testing.assert_close(state[f"{module}.weight"], expected, rtol=0, atol=1e-5)


def test_magmax_rebuilds_its_eval_model_after_a_crash_in_evaluation(runs, tmp_path):
    """Stage 2 trained and merged, killed while evaluating: restore rebuilds W0 + magmax(τ1, τ2)
    from the train weights and the stage files, and scores the same row."""
    src_dir, results = runs["magmax"]
    shutil.copytree(src_dir, tmp_path, dirs_exist_ok=True)
    partial = json.loads((tmp_path / "results.json").read_text())
    partial.update(complete=False, status="running", stages=partial["stages"][:1])
    partial["matrix"][2] = [None, None]
    (tmp_path / "results.json").write_text(json.dumps(partial))
    threads = torch.get_num_threads()
    again = run(compose(ARGS + MERGES["magmax"]), tmp_path)
    torch.set_num_threads(threads)
    assert again["matrix"] == results["matrix"]


def test_magmax_sigkill_mid_stage_2_resumes_to_the_identical_matrix(runs, tmp_path):
    args = ARGS + MERGES["magmax"] + [f"hydra.run.dir={tmp_path}"]
    killed = run_cli(args, env_extra={"CL_BENCH_KILL_AT": "train:2:3"})  # after stage 2's step-2 checkpoint
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "stages" / "stage_02" / "checkpoint" / "state.json").exists()
    assert (tmp_path / "stages" / "stage_01" / "merge.safetensors").exists()  # stage 1's merge state
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = json.loads((tmp_path / "results.json").read_text())
    reference = runs["magmax"][1]
    assert final["matrix"] == reference["matrix"]
    assert _curves(final) == _curves(reference)


def test_remerge_recomputes_a_post_hoc_merge_and_evaluates_only_the_rows_that_change(runs, tmp_path):
    src_dir, absorb = runs["absorb"]
    shutil.copytree(src_dir, tmp_path, dirs_exist_ok=True)
    threads = torch.get_num_threads()
    # magmax and dare train as absorb does: the remerged files are those runs' results
    for name in ("magmax", "dare"):
        assert remerge_main([str(tmp_path), f"merge={name}"]) == 0
        out = json.loads((tmp_path / f"results.remerge-{name}.json").read_text())
        real = runs[name][1]
        assert out["matrix"] == real["matrix"] and out["metrics"] == real["metrics"], name
        assert out["remerge"]["same_training"] is True and out["config"]["merge"] == real["config"]["merge"]
    assert out["remerge"]["rows_copied"] == [0, 1] and out["remerge"]["rows_evaluated"] == [2]  # dare(τ1) = τ1
    magmax = json.loads((tmp_path / "results.remerge-magmax.json").read_text())["remerge"]
    assert magmax["rows_copied"] == [0, 1] and magmax["rows_evaluated"] == [2]  # magmax(τ1) = τ1
    for stage in (0, 1, 2):
        assert sorted(p.name for p in (tmp_path / "predictions.remerge-magmax" / f"stage_{stage:02d}").iterdir()) == [
            "sentiment.jsonl",
            "sentiment_flip.jsonl",
        ]
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads((src_dir / "results.json").read_text())
    # the same merge again: nothing changes, nothing is evaluated
    assert remerge_main([str(tmp_path), "merge=absorb", "--name", "same"]) == 0
    same = json.loads((tmp_path / "results.remerge-same.json").read_text())
    assert same["remerge"]["rows_evaluated"] == [] and same["matrix"] == absorb["matrix"]
    # a merge that trains on its merged model: over two stages it trained as absorb did (stage 2 starts
    # from W0 + τ1 under every merge: the identity on one task vector), and the file says so
    assert remerge_main([str(tmp_path), "merge=ties", "merge.train_on=merged"]) == 0
    merged = json.loads((tmp_path / "results.remerge-ties_train_on=merged.json").read_text())["remerge"]
    assert merged["same_training"] is True and merged["post_hoc"] is True
    torch.set_num_threads(threads)


def test_remerge_takes_merge_overrides_only(tmp_path, capsys):
    assert remerge_main([str(tmp_path), "merge=ties", "trainer.lr=0.1"]) == 2
    assert "'trainer.lr=0.1' is not a merge override" in capsys.readouterr().err
    assert remerge_main([str(tmp_path), "merge=nope"]) == 2
    assert "merge='nope' is not a known choice" in capsys.readouterr().err
    assert remerge_main([str(tmp_path), "merge=average", "merge.lam=0.5"]) == 2
    assert "merge.lam is not a knob of merge=average; valid: train_on" in capsys.readouterr().err
    assert remerge_main([str(tmp_path), "merge=ties"]) == 2
    assert "results.json not found" in capsys.readouterr().err

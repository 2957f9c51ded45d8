"""The bench's real-model code paths (`--model smollm2`: references, ceiling, whole runs, preset, the
generated performance note), run on the tiny model in process at the smallest sizes, so that they do
not first break on a real-model bench run."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import CACHE

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def bench(tiny_model_dir):
    """A one-thread CPU Bench on generated tasks (no data folder)."""
    from transformers import AutoTokenizer

    from cl_bench.bench.setup import Bench, load_tasks

    b = Bench(device=torch.device("cpu"), threads=1, cache_dir=str(CACHE), data_root=None, repeats=1, compile=False)
    b.basis = "cpu"
    load_tasks(b, AutoTokenizer.from_pretrained(tiny_model_dir))
    return b


def _spec(**kw):
    from cl_bench.bench.setup import ModelSpec

    base = dict(rank=4, max_len=64, batch_size=2, train_steps=1, eval_examples=3, eval_new_tokens=4)
    return ModelSpec("tiny", **{**base, **kw})


def test_eval_references_give_ours_predictions(bench):
    """Plain HF generate and lm-eval's generate_until on the same prompts, the authors' batch 8 and
    the prefill row: each counts its predictions equal to ours."""
    from cl_bench.bench.evals import phase_eval

    spec = _spec(eval_variants=("authors", "ours", "hf_generate", "lm_eval", "prefill"))
    rows = {r["key"]: r for r in phase_eval(bench, spec)}
    assert set(rows) == {"authors", "ours", "hf_generate", "lm_eval", "prefill"}
    assert rows["ours"]["same_predictions_as_ours"] == rows["ours"]["examples"] == 6
    for key in ("authors", "hf_generate", "lm_eval"):
        assert 0 <= rows[key]["same_predictions_as_ours"] <= 6 and rows[key]["examples_per_s"] > 0
    assert rows["prefill"]["gflops"] > 0 and 0 <= rows["prefill"]["padding"] < 1


def test_train_references_and_ceiling(bench):
    """cl_bench's trainer beside the authors' loop and a transformers.Trainer + PEFT loop, with the
    matmul ceiling measured in the same process; GFLOP/s and its share of the ceiling per row."""
    from cl_bench.bench.phases import phase_train

    rows = phase_train(bench, _spec(ceiling_square=64), ["group", "reference", "hf_trainer"])
    by = {r["key"]: r for r in rows}
    assert {"group", "reference", "hf_trainer", "ceiling"} <= set(by)
    assert by["ceiling"]["fp32_square_gflops"] > 0 and by["ceiling"]["fp32_model_shapes_gflops"] > 0
    for key in ("group", "reference", "hf_trainer"):
        assert by[key]["tokens"] > 0 and by[key]["gflops"] > 0 and by[key]["of_ceiling"] > 0
        assert by[key]["loss_last"] == pytest.approx(by["group"]["loss_last"], rel=0.2)


def test_authors_pipeline_and_whole_runs(bench, tmp_path):
    """The authors' pipeline (as modeled) and a cl_bench run through the runner on the same two
    generated tasks with SLICE (capture, absorption, training, merge, evaluation): lower-triangular
    matrices, seconds per part; the target compares them."""
    from cl_bench.bench.runs import _authors, _ours, fresh_cache
    from cl_bench.bench.targets import _real_targets

    spec = _spec(run_train=4, run_eval=2, capture_steps=1, capture_batch_size=2, max_len=48)
    rows = []
    cache = str(fresh_cache(bench, tmp_path / "cache"))  # a cold SLICE init and row 0, as in the bench
    rows = _authors(bench, spec, "slice") + _ours(bench, spec, "slice", cache, "test")
    authors, ours = (r["matrix"] for r in rows)
    assert len(authors) == 2 and len(ours) == 3  # cl_bench also evaluates the base model (row 0)
    assert None not in authors[-1] and None not in ours[-1] and authors[0][1] is None
    (goal,) = _real_targets(rows)
    assert goal["measured"] == rows[0]["seconds"] / rows[1]["seconds"] > 0


def test_preset_row(bench):
    """One preset run in its own process (the tiny model's `debug` preset): wall and CPU seconds,
    the load around it, and its target."""
    from cl_bench.bench.runs import phase_preset
    from cl_bench.bench.targets import _real_targets

    rows = phase_preset(bench, _spec(), extra=["trainer.max_steps=1", "sequence.n_train=8", "sequence.n_eval=2"])
    assert rows[0]["phase"] == "preset" and rows[0]["wall_s"] > 0 and rows[0]["cpu_s"] > 0
    assert "experiment=debug" in rows[0]["variant"] and "->" in rows[0]["load"]
    (goal,) = _real_targets(rows)
    assert goal["target"] == "one run of the CPU real-model preset" and goal["ok"] in (True, False)


def test_performance_note_generated(tmp_path):
    """docs/performance.md from a bench.json (plus a preset bench.json merged in): the machine with
    its load, the targets table with pass/miss, a table per model and the plot; no local paths."""
    from cl_bench.bench import doc

    def r(phase, key, seconds, **kw):
        return dict(model="smollm2", phase=phase, variant=key, key=key, seconds=seconds, **kw)

    rows = [
        r("whole run", "authors:vanilla", 10.0, parts={"train": 6.0}),
        r("whole run", "ours:vanilla:cold", 4.0, parts={"train": 3.0}),
        r("train", "group", 1.0, tokens_per_s=100.0),
        r("train", "hf_trainer", 1.2, tokens_per_s=80.0),
        r("eval", "ours", 1.0, examples_per_s=9.0),
        r("eval", "authors", 3.0, examples_per_s=3.0),
    ]
    machine = dict(device="cpu", torch="x", threads=1, threads_source="t", seconds_basis="cpu", seconds=60.0)
    machine.update(load_average_start=[2.0, 2.0, 2.0], load_average_end=[3.0, 3.0, 3.0], bf16_peak_tflops=None)
    goal = dict(model="smollm2", target="whole run", goal=">= 2x", measured=2.5, ok=True, note="n")
    main = dict(machine=machine, data="SuperNI samples (/somewhere/data)", notes=["a"], rows=rows, targets=[goal])
    preset = dict(machine=machine, data="d", notes=["a"], rows=[r("preset", "preset:real_standard", 700.0)])
    preset["targets"] = [dict(goal, target="one run of the CPU real-model preset", ok=False, measured=700.0)]
    (tmp_path / "bench.json").write_text(json.dumps(main))
    (tmp_path / "preset.json").write_text(json.dumps(preset))
    out = tmp_path / "performance.md"
    doc.main([str(tmp_path / "bench.json"), "--out", str(out), "--add", str(tmp_path / "preset.json")])
    text = out.read_text()
    assert "load average (1, 5, 15 min) at the start 2.00 2.00 2.00" in text and "**miss**" in text
    assert "SuperNI samples (DATA)" in text and "/somewhere" not in text  # no machine-local paths
    assert "![cl_bench against the references](performance.png)" in text and out.with_suffix(".png").is_file()
    assert len(json.loads((tmp_path / "bench.json").read_text())["targets"]) == 2

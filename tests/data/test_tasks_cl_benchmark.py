"""Standard / Long CL benchmark loader (O-LoRA format)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cl_bench.data.tasks import cl_benchmark
from cl_bench.evaluation.scoring import score
from cl_bench.infra.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SC_INSTRUCTION = "What is the sentiment of the following paragraph? Choose one from the option.\n"


@pytest.fixture(scope="module")
def shared_data() -> Path:
    if not (SHARED_DATA / "cl_benchmark").is_dir():
        pytest.skip(f"real CL-benchmark samples not found at {SHARED_DATA}/cl_benchmark (an optional data folder)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def no_env_root(monkeypatch):
    monkeypatch.delenv("CL_BENCH_DATA", raising=False)


def write_repo_layout(root: Path, name="amazon", group="SC", n_train=10, n_test=6) -> Path:
    """The layout of the O-LoRA repo: CL_Benchmark/<group>/<name>/ and configs/instruction_config.json."""
    folder = root / "CL_Benchmark" / group / name
    folder.mkdir(parents=True)
    labels = ["negative", "positive"]
    (folder / "labels.json").write_text(json.dumps(labels))
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [{"label": labels[i % 2], "sentence": f"Text: {split} review {i}\n"} for i in range(n)]
        (folder / f"{split}.json").write_text(json.dumps(rows))
    (root / "configs").mkdir(exist_ok=True)
    (root / "configs" / "instruction_config.json").write_text(
        json.dumps({"SC": [{"instruction_type": "zero-shot", "instruction": SC_INSTRUCTION}]})
    )
    return folder


def test_repo_layout_prompt_labels_and_metric(tmp_path):
    write_repo_layout(tmp_path)
    task = cl_benchmark.load_task("amazon", root=str(tmp_path), n_train=None, n_eval=100, seed=42)
    assert task.metric == "ni_exact_match" and task.labels == ["negative", "positive"]  # O-LoRA scores by the NI rules
    assert len(task.train) == 10 and len(task.eval) == 6
    ex = task.eval[0]
    i = int(ex.id.rsplit("-", 1)[1])
    assert ex.prompt == f"{SC_INSTRUCTION}Option: negative, positive \nText: test review {i}\n\nAnswer:"
    assert ex.target == ["negative", "positive"][i % 2]
    assert score(task.metric, "Positive", "positive", task.labels) == 1.0


def test_names_and_aliases():
    assert cl_benchmark.resolve_task_name("ag") == "agnews"
    assert cl_benchmark.resolve_task_name("sst-2") == "SST-2"
    assert cl_benchmark.resolve_task_name("mnli") == "MNLI"
    with pytest.raises(DataError, match="valid: dbpedia"):
        cl_benchmark.resolve_task_name("squad")
    assert len(cl_benchmark.GROUPS) == 15


def test_missing_instruction_file_is_a_clear_error(tmp_path):
    write_repo_layout(tmp_path)
    (tmp_path / "configs" / "instruction_config.json").unlink()
    with pytest.raises(DataError, match="instruction_config.json"):
        cl_benchmark.load_task("amazon", root=str(tmp_path), n_train=None, n_eval=10, seed=42)


def test_unlabelled_records_are_skipped_and_counted(tmp_path):
    folder = write_repo_layout(tmp_path)
    rows = json.loads((folder / "test.json").read_text())
    rows.append({"label": "-", "sentence": "Text: no gold label\n"})
    (folder / "test.json").write_text(json.dumps(rows))
    task = cl_benchmark.load_task("amazon", root=str(tmp_path), n_train=None, n_eval=100, seed=42)
    assert len(task.eval) == 6 and task.info["skipped_unlabelled"] == 1


def test_missing_data_message(tmp_path):
    with pytest.raises(DataError) as info:
        cl_benchmark.load_task("yahoo", root=str(tmp_path), n_train=None, n_eval=10, seed=42)
    msg = str(info.value)
    assert "\n" not in msg and "'yahoo'" in msg
    assert str(tmp_path / "cl_benchmark" / "yahoo" / "train.json") in msg
    assert str(tmp_path / "CL_Benchmark" / "TC" / "yahoo" / "train.json") in msg
    assert "github.com/cmnfriend/O-LoRA" in msg and "data.root" in msg


def test_all_fifteen_real_samples_load(shared_data):
    for name in cl_benchmark.GROUPS:
        task = cl_benchmark.load_task(name, root=str(shared_data), n_train=None, n_eval=500, seed=42)
        assert task.labels and {e.target for e in task.train + task.eval} <= set(task.labels)
        assert not {e.prompt for e in task.train} & {e.prompt for e in task.eval}
        assert all(e.prompt.endswith("\nAnswer:") for e in task.eval)
        if name != "COPA":
            assert all("Option: " + ", ".join(task.labels) in e.prompt for e in task.eval)


def test_real_sample_split_is_seeded(shared_data):
    a = cl_benchmark.load_task("dbpedia", root=str(shared_data), n_train=50, n_eval=30, seed=42)
    b = cl_benchmark.load_task("dbpedia", root=str(shared_data), n_train=None, n_eval=30, seed=42)
    assert [e.id for e in a.eval] == [e.id for e in b.eval] and len(a.eval) == 30
    assert [e.id for e in a.train] == [e.id for e in b.train][:50]
    assert all(e.id.startswith("dbpedia-test-") for e in a.eval)
    assert all(e.id.startswith("dbpedia-train-") for e in a.train)

"""Train/eval splits never leak an evaluated prompt into training, on every family's split path,
and say how many training examples they dropped (results.json `split_stats`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cl_bench.data.tasks import cl_benchmark, split_stats, superni, synthetic, trace
from cl_bench.data.tasks.base import Example, prompt_key, split_examples, split_train_test


@pytest.fixture(autouse=True)
def no_env_root(monkeypatch):
    monkeypatch.delenv("CL_BENCH_DATA", raising=False)


def _leaks(task) -> int:
    train = {prompt_key(e) for e in task.train}
    return sum(prompt_key(e) in train for e in task.eval)


def _superni(root: Path, copies: int) -> str:
    name = "task088_identify_typo_verification"
    instances = [
        {"id": f"i{k}-{c}", "input": f"word number {k}", "output": [f"w{k}"]} for k in range(20) for c in range(copies)
    ]
    (root / f"{name}.json").write_text(json.dumps({"Definition": ["Say it."], "Instances": instances}))
    return name


@pytest.mark.parametrize("copies, dropped", [(2, 10), (3, 16)])
def test_superni_held_out_split_drops_every_duplicate_of_an_evaluated_input(tmp_path, copies, dropped):
    # 20 inputs, each `copies` times, 20 held out: by index alone 10/20 (2 copies) and 20/20
    # (3 copies) evaluated prompts were also trained on.
    task = superni.load_task(_superni(tmp_path, copies), root=str(tmp_path), n_train=None, n_eval=20, seed=42)
    assert len(task.eval) == 20 and _leaks(task) == 0
    assert task.split_stats == {"train": 20 * copies - 20 - dropped, "eval": 20, "dropped_duplicates": dropped}


def test_n_train_is_cut_after_the_drop(tmp_path):
    task = superni.load_task(_superni(tmp_path, 3), root=str(tmp_path), n_train=8, n_eval=20, seed=42)
    assert len(task.train) == 8 and _leaks(task) == 0 and task.info["dropped_duplicates"] == 16


def test_trace_and_cl_benchmark_held_out_splits_drop_duplicates(tmp_path):
    folder = tmp_path / "trace" / "MeetingBank"
    folder.mkdir(parents=True)
    records = [{"prompt": f"Summarize meeting {k}.", "answer": f"Summary {k}."} for k in range(10) for _ in range(2)]
    (folder / "train.json").write_text(json.dumps(records))
    data = trace.load_task("MeetingBank", root=str(tmp_path), n_train=None, n_eval=10, seed=1)
    assert _leaks(data) == 0 and data.split_stats["dropped_duplicates"] > 0
    assert data.split_stats["train"] + data.split_stats["eval"] + data.split_stats["dropped_duplicates"] == 20

    cl = tmp_path / "cl_benchmark" / "SST-2"
    cl.mkdir(parents=True)
    (cl / "labels.json").write_text(json.dumps(["Bad", "Good"]))
    rows = [{"label": "Good" if k % 2 else "Bad", "sentence": f"Review {k}"} for k in range(10) for _ in range(2)]
    (cl / "train.json").write_text(json.dumps(rows))
    (tmp_path / "cl_benchmark" / "instruction_config.json").write_text(
        json.dumps({"SC": [{"instruction_type": "zero-shot", "instruction": "Sentiment? "}]})
    )
    task = cl_benchmark.load_task("SST-2", root=str(tmp_path), n_train=None, n_eval=10, seed=1)
    assert _leaks(task) == 0 and task.split_stats["dropped_duplicates"] > 0


def test_test_file_path_catches_copies_that_differ_only_in_spacing():
    test_pool = [Example("t0", "Say  it:\nword 1 ", "w1"), Example("t1", "Say it: word 2", "w2")]
    train_pool = [Example("a", "Say it: word 1", "w1"), Example("b", "Say it: word 3", "w3")]
    train, evaluated, dropped = split_train_test(train_pool, test_pool, None, 2, seed=0)
    assert [e.id for e in train] == ["b"] and dropped == 1 and len(evaluated) == 2


def test_synthetic_and_helper_splits_report_their_stats():
    task = synthetic.load_task("sentiment", root=None, n_train=32, n_eval=8, seed=42)
    assert split_stats([task]) == {"sentiment": {"train": 32, "eval": 8, "dropped_duplicates": 0}}
    examples = [Example(str(i), f"p{i % 3}", "t") for i in range(6)]
    train, held, dropped = split_examples(examples, None, 3, seed=0)
    assert not {prompt_key(e) for e in train} & {prompt_key(e) for e in held}
    assert len(train) + len(held) + dropped == 6

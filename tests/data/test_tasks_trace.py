"""TRACE loader and TRACE's official metrics, on small files written here in TRACE's format
(`<Task>/{train,eval,test}.json`, lists of {"prompt", "answer"}); no TRACE data exists locally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cl_bench.data.tasks import trace
from cl_bench.evaluation.scoring import score
from cl_bench.infra.errors import DataError

FOMC = "What is the monetary policy stance for the following text? A. dovish, B. hawkish, C. neutral. Choose one from A, B and C.\n"
SCIENCEQA = "Choose an answer for the following question and give your reasons.\n\n"
MATH = "Solve the following math problem.\n"


def _records(task: str, split: str, n: int) -> list[dict]:
    out = []
    for i in range(n):
        tag = f"{split}{i}"
        if task in ("C-STANCE", "FOMC"):
            out.append({"prompt": f"{FOMC}Text {tag}.", "answer": "ABC"[i % 3]})
        elif task == "ScienceQA":
            out.append(
                {
                    "prompt": f"{SCIENCEQA}Question {tag}? (A) x (B) y",
                    "answer": f"Answer: {'AB'[i % 2]}\nBecause reason {tag}.",
                }
            )
        elif task.startswith("NumGLUE"):
            out.append({"prompt": f"{MATH}What is {i} + 1? ({tag})", "answer": str(i + 1)})
        elif task == "MeetingBank":
            out.append(
                {
                    "prompt": f"Write a summary of the following meeting transcripts.\nMeeting {tag} ...",
                    "answer": f"The council met ({tag}).",
                }
            )
        elif task == "Py150":
            out.append({"prompt": f"Continue writing the code.\ndef f_{tag}():", "answer": "return <NUM_LIT>"})
        else:  # 20Minuten
            out.append(
                {
                    "prompt": f"{trace.SIMPLIFY_PREFIX}Der komplizierte Satz {tag} steht hier.",
                    "answer": f"Der Satz {tag} ist einfach.",
                }
            )
    return out


def write_trace(root: Path, task: str, sizes=(12, 4, 6)) -> Path:
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "eval", "test"), sizes):
        if n:
            (folder / f"{split}.json").write_text(json.dumps(_records(task, split, n), ensure_ascii=False))
    return folder


@pytest.fixture(autouse=True)
def no_env_root(monkeypatch):
    monkeypatch.delenv("CL_BENCH_DATA", raising=False)


@pytest.mark.parametrize("task", trace.TASKS)
def test_every_task_loads_with_its_official_metric(tmp_path, task):
    write_trace(tmp_path / "trace", task)
    data = trace.load_task(task, root=str(tmp_path), n_train=None, n_eval=200, seed=42)
    assert data.metric == trace.TASK_METRICS[task][0]
    assert len(data.train) == 12 and len(data.eval) == 6  # eval from test.json
    assert all("test" in e.prompt for e in data.eval) and all("train" in e.prompt for e in data.train)
    assert data.info["eval_file"] == "test.json"
    # The prompt is TRACE's own prompt (instruction included), the target its answer.
    assert data.train[0].prompt.startswith(_records(task, "train", 1)[0]["prompt"][:10])


def test_metric_assignment_matches_trace():
    metrics = {t: m for t, (m, _) in trace.TASK_METRICS.items()}
    assert metrics == {
        "C-STANCE": "accuracy",
        "FOMC": "accuracy",
        "ScienceQA": "accuracy",
        "NumGLUE-cm": "accuracy",
        "NumGLUE-ds": "accuracy",
        "MeetingBank": "rouge_l",
        "Py150": "edit_similarity",
        "20Minuten": "sari",
    }


def test_falls_back_to_eval_json_then_to_holding_out(tmp_path):
    write_trace(tmp_path, "FOMC", sizes=(12, 4, 0))
    data = trace.load_task("fomc", root=str(tmp_path), n_train=5, n_eval=3, seed=1)
    assert data.info["eval_file"] == "eval.json" and len(data.eval) == 3 and len(data.train) == 5
    write_trace(tmp_path / "only_train", "FOMC", sizes=(12, 0, 0))
    data = trace.load_task("FOMC", root=str(tmp_path / "only_train"), n_train=None, n_eval=4, seed=1)
    assert data.info["eval_from"] == "held out of the training file"
    assert len(data.eval) == 4 and len(data.train) == 8
    assert not {e.prompt for e in data.train} & {e.prompt for e in data.eval}


def test_single_archive_variant_is_used_and_several_are_refused(tmp_path):
    write_trace(tmp_path / "LLM-CL-Benchmark_500", "Py150")
    data = trace.load_task("Py150", root=str(tmp_path), n_train=None, n_eval=10, seed=42)
    assert "LLM-CL-Benchmark_500" in data.origin
    write_trace(tmp_path / "LLM-CL-Benchmark_5000", "Py150")
    with pytest.raises(DataError, match="several archive variants"):
        trace.load_task("Py150", root=str(tmp_path), n_train=None, n_eval=10, seed=42)


def test_20minuten_examples_carry_the_source_paragraph(tmp_path):
    write_trace(tmp_path, "20Minuten")
    data = trace.load_task("20Minuten", root=str(tmp_path), n_train=None, n_eval=10, seed=42)
    ex = data.eval[0]
    assert ex.source.startswith("Der komplizierte Satz") and trace.SIMPLIFY_PREFIX not in ex.source
    assert score(data.metric, ex.target, ex.target, data.labels, source=ex.source) > score(
        data.metric, ex.source, ex.target, data.labels, source=ex.source
    )


def test_trace_metrics_on_trace_style_outputs(tmp_path):
    for task in trace.TASKS:
        write_trace(tmp_path, task)
    load = lambda t: trace.load_task(t, root=str(tmp_path), n_train=None, n_eval=10, seed=42)  # noqa: E731
    fomc = load("FOMC")
    assert score(fomc.metric, "B", "B", fomc.labels) == 1.0
    assert score(fomc.metric, "B. hawkish", "B", fomc.labels) == 1.0
    assert score(fomc.metric, "A", "B", fomc.labels) == 0.0
    sqa = load("ScienceQA")
    assert score(sqa.metric, "Answer: B\nBecause other words.", "Answer: B\nBecause reason.", sqa.labels) == 1.0
    assert score(sqa.metric, "Because B is right", "Answer: B\nBecause reason.", sqa.labels) == 0.0
    num = load("NumGLUE-cm")
    assert score(num.metric, "7", "7", num.labels) == 1.0 and score(num.metric, "17", "7", num.labels) == 0.0
    py = load("Py150")
    assert score(py.metric, "return 0", "return <NUM_LIT>", py.labels) == 1.0
    assert score(py.metric, "return x", "return <NUM_LIT>", py.labels) == pytest.approx(2 * 7 / 16)
    meeting = load("MeetingBank")
    assert score(meeting.metric, "the council met", "The council met today.", meeting.labels) == pytest.approx(
        2 * 1 * 0.75 / 1.75
    )


def test_multiple_choice_answers_must_name_an_option(tmp_path):
    folder = write_trace(tmp_path, "FOMC")
    records = json.loads((folder / "train.json").read_text())
    records[3]["answer"] = "dovish"
    (folder / "train.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match="names none of the options"):
        trace.load_task("FOMC", root=str(tmp_path), n_train=None, n_eval=10, seed=42)


def test_bad_format_and_unknown_task(tmp_path):
    folder = tmp_path / "MeetingBank"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(DataError, match="lacks 'prompt'"):
        trace.load_task("MeetingBank", root=str(tmp_path), n_train=None, n_eval=2, seed=0)
    with pytest.raises(DataError, match="valid: C-STANCE"):
        trace.load_task("GSM8K", root=str(tmp_path), n_train=None, n_eval=2, seed=0)


def test_missing_data_message(tmp_path):
    with pytest.raises(DataError) as info:
        trace.load_task("C-STANCE", root=str(tmp_path), n_train=None, n_eval=200, seed=42)
    msg = str(info.value)
    assert "\n" not in msg and "'C-STANCE'" in msg
    assert str(tmp_path / "trace" / "C-STANCE" / "train.json") in msg
    assert "github.com/BeyonderXX/TRACE" in msg and "data.root" in msg


@pytest.mark.slow
def test_end_to_end_run_on_trace_format_files(tmp_path, tiny_model_dir):
    from cl_bench.run.runner import run
    from helpers import FAST, compose

    for task in ("FOMC", "20Minuten"):
        write_trace(tmp_path / "data" / "trace", task, sizes=(24, 0, 8))
    cfg = compose(FAST + ["sequence=trace", "sequence.tasks=[FOMC,20Minuten]", f"data.root={tmp_path / 'data'}"])
    results = run(cfg, tmp_path / "run")
    assert results["complete"] is True and results["tasks"] == ["FOMC", "20Minuten"]
    assert all(v is not None and 0.0 <= v <= 100.0 for row in results["matrix"] for v in row)
    records = [
        json.loads(x)
        for x in (tmp_path / "run" / "predictions" / "stage_02" / "20Minuten.jsonl").read_text().splitlines()
    ]
    assert len(records) == 8
    # SARI got the source paragraph: re-scoring a record with it reproduces the saved score.
    by_prompt = {
        e.prompt: e
        for e in trace.load_task("20Minuten", root=str(tmp_path / "data"), n_train=None, n_eval=8, seed=42).eval
    }
    for rec in records:
        ex = by_prompt[rec["prompt"]]
        expected = score("sari", rec["prediction"], rec["target"], None, source=ex.source)
        assert rec["score"] == pytest.approx(expected)

"""An empty test file is not the same as none: evaluation moves to examples held out of the
training file, and the run says so in one console line, in results.json and in its summary."""

import json
import logging

from cl_bench.data.tasks import cl_benchmark, trace
from cl_bench.run.summary import format_summary
from helpers import compose


def fomc(root, test_records):
    folder = root / "trace" / "FOMC"
    folder.mkdir(parents=True)
    rows = [
        {"prompt": f"Stance of text {i}? A. dovish, B. hawkish, C. neutral.", "answer": "ABC"[i % 3]} for i in range(12)
    ]
    (folder / "train.json").write_text(json.dumps(rows))
    (folder / "test.json").write_text(json.dumps(test_records))
    return folder


def test_an_empty_test_file_is_noticed_not_silent(tmp_path):
    folder = fomc(tmp_path, [])
    task = trace.load_task("FOMC", root=str(tmp_path), n_train=None, n_eval=4, seed=0)
    assert task.info["eval_from"] == "held out of the training file"
    notice = task.split_stats["notice"]
    assert str(folder / "test.json") in notice and "held out of the training file" in notice and "4 examples" in notice


def test_a_cl_benchmark_empty_test_file_is_noticed(tmp_path):
    folder = tmp_path / "CL_Benchmark" / "SC" / "amazon"  # the O-LoRA repo's layout
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(["positive", "negative"]))
    rows = [{"sentence": f"review {i}", "label": ["positive", "negative"][i % 2]} for i in range(12)]
    (folder / "train.json").write_text(json.dumps(rows))
    (folder / "test.json").write_text("[]")
    (tmp_path / "configs").mkdir()
    instruction = [{"instruction_type": "zero-shot", "instruction": "What is the sentiment? "}]
    (tmp_path / "configs" / "instruction_config.json").write_text(json.dumps({"SC": instruction}))
    task = cl_benchmark.load_task("amazon", root=str(tmp_path), n_train=None, n_eval=4, seed=0)
    assert "holds no example" in task.split_stats["notice"]


def test_the_run_says_so_on_the_console_and_in_its_summary(tmp_path, tiny_model_dir, caplog):
    from cl_bench.run.runner import Runner

    fomc(tmp_path / "data", [])
    cfg = compose(
        [
            "sequence=trace",
            "sequence.tasks=[FOMC]",
            f"data.root={tmp_path / 'data'}",
            "general_eval=none",
            "progress=false",
        ]
    )
    runner = Runner(cfg, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="cl_bench"):
        runner.prepare()
    lines = [r.getMessage() for r in caplog.records if "holds no example" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("task FOMC: ")
    results = runner.new_results()
    assert "holds no example" in results["split_stats"]["FOMC"]["notice"]
    summary = format_summary(results)
    assert "data notes:" in summary and "FOMC: " in summary.split("data notes:")[1]

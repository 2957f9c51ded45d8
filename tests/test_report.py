"""The report command: one row per method and varying knobs, mean ± std over seeds."""
import json
import re

from cl_bench.report import main


def fake_run(path, target, c, seed, ap, complete=True):
    path.mkdir(parents=True)
    metrics = {m: None for m in ["AP", "FP", "Fgt", "BWT", "FWT", "FR", "Acc", "AAA", "GP", "IP"]}
    metrics.update(AP=ap, FP=ap - 10)
    init = {"_target_": target, "operator": "pcgrad"} | ({"c": c} if c is not None else {})
    (path / "results.json").write_text(json.dumps({
        "sequence": "s", "metrics": metrics, "complete": complete,
        "config": {"initializer": init, "lora": {"r": 8, "alpha": 16}, "seed": seed}}))


def test_summary_groups_seeds_and_shows_only_varying_knobs(tmp_path, capsys):
    fake_run(tmp_path / "0", "x.Slice", 0.5, 1, 60.0)
    fake_run(tmp_path / "1", "x.Slice", 0.5, 2, 70.0)
    fake_run(tmp_path / "2", "x.Slice", 1.0, 1, 50.0)
    fake_run(tmp_path / "3", "x.Vanilla", None, 1, 40.0)
    fake_run(tmp_path / "4", "x.Vanilla", None, 2, 99.0, complete=False)
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "65.00 ± 7.07" in out  # mean and sample std of 60, 70
    assert "operator" not in out  # constant knob left out
    assert "c=1.0" in out and "1 incomplete run(s) left out" in out
    assert (tmp_path / "out" / "summary.csv").exists() and (tmp_path / "out" / "runs.csv").exists()


def test_no_results_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


def write_run(path, seed, ap, **config):
    """A results.json whose config is a plain vanilla run plus `config` (dotted keys)."""
    cfg = {"initializer": {"_target_": "x.Vanilla"}, "trainer": {"lr": 0.002, "epochs": 6},
           "sequence": {"name": "s", "tasks": ["a", "b"]}, "seed": seed,
           "data": {"root": str(path)}, "progress": True}
    for key, value in config.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(
        {"sequence": "s", "metrics": {"AP": ap}, "complete": True, "config": cfg}))


def test_runs_that_differ_only_in_lr_are_two_experiments(tmp_path, capsys):
    write_run(tmp_path / "a", 1, 60.0)
    write_run(tmp_path / "b", 2, 70.0, progress=False)  # a non-result key and the path differ too
    write_run(tmp_path / "c", 1, 20.0, trainer__lr=0.0001)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip().startswith("s ")]
    assert len(rows) == 2, out
    assert any("trainer.lr=0.002" in r and "65.00 ± 7.07" in r for r in rows), out
    assert any("trainer.lr=0.0001" in r and "20.00" in r for r in rows), out
    assert "progress" not in out and "data.root" not in out


def test_same_seed_twice_counts_once_with_a_duplicate_warning(tmp_path, capsys):
    write_run(tmp_path / "first", 7, 60.0)
    write_run(tmp_path / "again", 7, 62.0)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row, = [line for line in out.splitlines() if line.strip().startswith("s ")]
    assert re.search(r"Vanilla\s+1\s+7\s+61\.00\s", row), row  # n=1, seeds "7", the duplicates' mean
    assert "duplicate: seed 7 of s Vanilla in 2 runs" in out


def test_different_task_lists_are_not_pooled(tmp_path, capsys):
    write_run(tmp_path / "x", 1, 60.0)
    write_run(tmp_path / "y", 1, 30.0, sequence__tasks=["a", "c"])
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert 'sequence.tasks=["a","b"]' in out and 'sequence.tasks=["a","c"]' in out

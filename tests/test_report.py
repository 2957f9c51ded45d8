"""The report command: one row per method and varying knobs, mean ± std over seeds."""
import json

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

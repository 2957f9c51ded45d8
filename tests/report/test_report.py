"""The report command: grouping, the paper layout with Δ rows, paired tests, run states,
flags, and every table and figure file it writes."""

import json
import math
import re

import pandas as pd
import pytest
import yaml

from cl_bench.report.cli import main
from cl_bench.report.stats import paired_test


def fake_run(path, target, c, seed, ap, complete=True):
    path.mkdir(parents=True)
    metrics = {m: None for m in ["AP", "FP", "Fgt", "BWT", "FWT", "FR", "Acc", "AAA", "GP", "IP"]}
    metrics.update(AP=ap, FP=ap - 10)
    init = {"_target_": target, "operator": "pcgrad"} | ({"c": c} if c is not None else {})
    (path / "results.json").write_text(
        json.dumps(
            {
                "sequence": "s",
                "metrics": metrics,
                "complete": complete,
                "config": {"initializer": init, "lora": {"r": 8, "alpha": 16}, "seed": seed},
            }
        )
    )


def table_rows(out: str, first_cell: str) -> list[str]:
    """Markdown rows of the printed summary whose first cell starts with `first_cell`."""
    return [line for line in out.splitlines() if re.match(rf"\|\s*{re.escape(first_cell)}", line)]


def test_summary_groups_seeds_and_shows_only_varying_knobs(tmp_path, capsys):
    fake_run(tmp_path / "0", "x.Slice", 0.5, 1, 60.0)
    fake_run(tmp_path / "1", "x.Slice", 0.5, 2, 70.0)
    fake_run(tmp_path / "2", "x.Slice", 1.0, 1, 50.0)
    fake_run(tmp_path / "3", "x.Vanilla", None, 1, 40.0)
    fake_run(tmp_path / "4", "x.Vanilla", None, 2, 99.0, complete=False)
    assert main([str(tmp_path), "--out", str(tmp_path / "out"), "--plots", "none"]) == 0
    out = capsys.readouterr().out
    assert "65.00 ± 7.07" in out  # mean and sample std of 60, 70
    assert "operator" not in out  # constant knob left out
    assert "Slice c=1.0" in out and "1 run(s) not complete, left out of the numbers (1 incomplete)" in out
    assert (tmp_path / "out" / "summary.csv").exists() and (tmp_path / "out" / "runs.csv").exists()


def test_no_results_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


def write_run(path, seed, ap, overrides=None, results=None, **config):
    """A results.json whose config is a plain vanilla run plus `config` (dotted keys as a__b);
    `overrides`: the job's command line as Hydra records it (.hydra/overrides.yaml)."""
    cfg = {
        "initializer": {"_target_": "x.Vanilla"},
        "trainer": {"lr": 0.002, "epochs": 6},
        "sequence": {"name": "s", "tasks": ["a", "b"]},
        "seed": seed,
        "data": {"root": str(path)},
        "progress": True,
    }
    for key, value in config.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.mkdir(parents=True)
    body = {
        "sequence": cfg["sequence"]["name"],
        "metrics": ap if isinstance(ap, dict) else {"AP": ap},
        "complete": True,
        "status": "complete",
        "config": cfg,
    }
    body.update(results or {})
    (path / "results.json").write_text(json.dumps(body))
    if overrides is not None:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


def test_runs_that_differ_only_in_lr_are_two_experiments(tmp_path, capsys):
    write_run(tmp_path / "a", 1, 60.0)
    write_run(tmp_path / "b", 2, 70.0, progress=False)  # a non-result key and the path differ too
    write_run(tmp_path / "c", 1, 20.0, trainer__lr=0.0001)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out, "s")
    assert len(rows) == 2, out
    assert any("trainer.lr=0.002" in r and "65.00 ± 7.07" in r for r in rows), out
    assert any("trainer.lr=0.0001" in r and "20.00" in r for r in rows), out
    assert "progress" not in out and "data.root" not in out


def test_same_seed_twice_counts_once_with_a_duplicate_warning(tmp_path, capsys):
    write_run(tmp_path / "first", 7, 60.0)
    write_run(tmp_path / "again", 7, 62.0)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (row,) = table_rows(out, "s")
    assert re.search(r"Vanilla\s*\|\s*1\s*\|\s*7\s*\|\s*61\.00\s", row), row  # n=1, seeds "7", the duplicates' mean
    assert "duplicate: seed 7 of s Vanilla in 2 runs" in out


def test_different_task_lists_are_not_pooled_and_are_flagged(tmp_path, capsys):
    write_run(tmp_path / "x", 1, 60.0)
    write_run(tmp_path / "y", 1, 30.0, sequence__tasks=["a", "c"])
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert 'sequence.tasks=["a","b"]' in out and 'sequence.tasks=["a","c"]' in out
    assert "unexpected: runs of s Vanilla with no recorded overrides differ in sequence.tasks" in out


def test_a_difference_no_override_explains_is_flagged(tmp_path, capsys):
    # One sweep cell (same overrides but the seed), yet lr differs: changed defaults between runs.
    write_run(tmp_path / "0", 1, 60.0, overrides=["sequence=s", "seed=1"])
    write_run(tmp_path / "1", 2, 62.0, overrides=["sequence=s", "seed=2"], trainer__lr=0.01)
    # A swept lr is expected: named on the command line.
    write_run(tmp_path / "2", 1, 50.0, overrides=["sequence=s", "trainer.lr=0.1", "seed=1"], trainer__lr=0.1)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    flags = [line for line in out.splitlines() if line.startswith("unexpected:")]
    assert flags == [
        "unexpected: runs of s Vanilla with overrides [sequence=s] differ in trainer.lr (0.002: 1 run, 0.01: 1 run); "
        "kept apart (different code defaults, or mixed sweeps?)"
    ], out


# ---- the paper layout, Δ rows and the paired test, hand-checked ---------------------------------
METRIC_VALUES = {  # (method, seed) -> AP, FP (Fgt = AP - FP)
    ("x.Vanilla", 1): (10.0, 4.0),
    ("x.Vanilla", 2): (20.0, 8.0),
    ("x.Vanilla", 3): (30.0, 9.0),
    ("x.Slice", 1): (15.0, 6.0),
    ("x.Slice", 2): (24.0, 14.0),
    ("x.Slice", 3): (36.0, 13.0),
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Vanilla and SLICE, 3 seeds each, with full results (matrix, loss curves, projection records)."""
    root = tmp_path_factory.mktemp("sweep")
    for k, ((target, seed), (ap, fp)) in enumerate(METRIC_VALUES.items()):
        init = {"_target_": target} | ({"c": 1.0} if "Slice" in target else {})
        stage2 = {
            "fired": seed != 2,
            "cos_global": -0.2 if seed != 2 else 0.1,
            "gamma": 0.5 if seed != 2 else 0.0,
            "projection": "fired" if seed != 2 else "not fired",
            "per_module": {"n": 4, "fired": 2 if seed != 2 else 0},
        }
        results = {
            "tasks": ["t1", "t2"],
            "matrix": [[0.0, 5.0], [ap, 10.0], [fp, ap]],
            "stages": [
                {
                    "stage": 1,
                    "task": "t1",
                    "init": {"projection": "skipped: no previous task", "fired": False},
                    "train": {"loss_curve": [3.0, 2.0, 1.0]},
                },
                {
                    "stage": 2,
                    "task": "t2",
                    "init": stage2 if "Slice" in target else {"method": "vanilla"},
                    "train": {"loss_curve": [2.5, 1.5, 0.5]},
                },
            ],
        }
        write_run(
            root / str(k),
            seed,
            {"AP": ap, "FP": fp, "Fgt": ap - fp, "GP": None},
            results=results,
            initializer=init,
            overrides=[f"initializer={'slice' if 'Slice' in target else 'vanilla'}", f"seed={seed}"],
        )
    return root


@pytest.fixture(scope="module")
def written(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(
            [
                str(sweep),
                "--baseline",
                "vanilla",
                "--out",
                str(out / "tables"),
                "--markdown",
                str(out / "docs" / "results.md"),
                "--title",
                "Results",
                "--plots",
                "summary",
            ]
        )  # per-run figures: test_per_run_figures
    assert code == 0
    return out, buf.getvalue()


def test_aggregation_and_delta_by_hand(written):
    out, console = written
    s = pd.read_csv(out / "tables" / "summary.csv").set_index("method")
    # Vanilla AP 10, 20, 30: mean 20, sample std 10; SLICE AP 15, 24, 36: mean 25, std sqrt(111).
    assert s.loc["Vanilla", "AP"] == pytest.approx(20.0) and s.loc["Vanilla", "AP_std"] == pytest.approx(10.0)
    assert s.loc["Slice", "AP"] == pytest.approx(25.0) and s.loc["Slice", "AP_std"] == pytest.approx(math.sqrt(111))
    assert s.loc["Slice", "AP_delta"] == pytest.approx(5.0) and math.isnan(s.loc["Vanilla", "AP_delta"])
    # FP: Vanilla 4, 8, 9 (mean 7), SLICE 6, 14, 13 (mean 11): Δ +4; Fgt Δ = 5 - 4 = +1.
    assert s.loc["Slice", "FP_delta"] == pytest.approx(4.0) and s.loc["Slice", "Fgt_delta"] == pytest.approx(1.0)
    assert list(s["role"]) == ["baseline", "delta"] and list(s["n"]) == [3, 3]
    assert "GP" not in s.columns  # measured in no run
    paper = (out / "tables" / "table_paper.md").read_text()
    assert "20.00 ± 10.00" in paper and f"+5.00 ± {math.sqrt(111):.2f}" in paper and "+4.00 ±" in paper
    assert re.search(r"Vanilla\s*\|\s*baseline\s*\|\s*3\s*\|\s*1,2,3\s*\|\s*20\.00 ± 10\.00", console), console


def test_paired_test_over_seeds_by_hand(written):
    out, _ = written
    p = pd.read_csv(out / "tables" / "paired_tests.csv").set_index("metric")
    # AP per seed: SLICE - Vanilla = 5, 4, 6: mean 5, sd 1, t = 5 / (1 / sqrt 3) on 2 df.
    t = 5 * math.sqrt(3)
    assert (
        p.loc["AP", "n"] == 3
        and p.loc["AP", "mean_diff"] == pytest.approx(5.0)
        and p.loc["AP", "std_diff"] == pytest.approx(1.0)
    )
    assert p.loc["AP", "t"] == pytest.approx(t)
    assert p.loc["AP", "p_t"] == pytest.approx(
        1 - t / math.sqrt(2 + t * t)
    )  # Student t, 2 df: P(|T| > t) in closed form
    assert p.loc["AP", "p_signflip"] == pytest.approx(
        0.25
    )  # all 3 differences positive: 2 of 8 sign patterns as extreme


def test_paired_test_unit_values():
    r = paired_test([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])  # d = 1, 2, 3: t = 2 / (1 / sqrt 3) = 3.4641
    assert (r.n, r.mean_diff, r.std_diff) == (3, 2.0, 1.0)
    assert r.t == pytest.approx(2 * math.sqrt(3)) and r.p_t == pytest.approx(1 - r.t / math.sqrt(2 + r.t**2))
    assert r.p_signflip == pytest.approx(0.25) and r.min_p_signflip == pytest.approx(0.25)
    mixed = paired_test(
        [1.0, -2.0, 3.0, 4.0], [0.0] * 4
    )  # |mean| 1.5; as extreme: ±(1,2,3,4) patterns with |sum| >= 6: 6 of 16
    assert mixed.p_signflip == pytest.approx(6 / 16)
    flat = paired_test([2.0, 3.0], [1.0, 2.0])  # sd(d) = 0: t undefined, the sign-flip p is its minimum
    assert math.isnan(flat.p_t) and flat.p_signflip == pytest.approx(0.5)
    assert math.isnan(paired_test([1.0], [0.0]).p_t)
    with pytest.raises(ValueError, match="equal-length"):
        paired_test([1.0, 2.0], [1.0])


def test_tables_in_every_format(written):
    out, _ = written
    tables = out / "tables"
    for name in ("summary", "table_paper", "paired_tests", "projection"):
        for ext in ("csv", "md", "tex"):
            assert (tables / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext}"
    tex = (tables / "table_paper.tex").read_text()
    assert all(rule in tex for rule in (r"\toprule", r"\midrule", r"\bottomrule")) and r"20.00 $\pm$ 10.00" in tex
    assert r"\multicolumn{3}{c}{s}" in tex  # the block's column group over AP, FP, Fgt
    assert (
        r"Slice & $\Delta$ & 3 & 1,2,3 & +5.00 $\pm$ 10.54" in (tables / "summary.tex").read_text()
    )  # escaped, not raw Δ/±
    proj = (tables / "projection.md").read_text()
    assert re.search(r"\|\s*s\s*\|\s*Slice\s*\|\s*2\s*\|\s*t2\s*\|\s*2/3 seeds\s*\|\s*-0\.100 ± 0\.173", proj), proj
    runs = pd.read_csv(tables / "runs.csv")
    assert len(runs) == 6 and set(runs["state"]) == {"complete"}


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_figures_and_the_document(written):
    out, _ = written
    figures = out / "tables" / "figures"
    assert sorted(p.name for p in figures.iterdir()) == [
        "AP-vs-FP__s.png",
        "R-mean-relative__s__Slice.png",
        "R-mean-relative__s__Vanilla.png",
        "R-mean__s__Slice.png",
        "R-mean__s__Vanilla.png",
    ]
    assert all(is_png(p) for p in figures.iterdir())
    doc = (out / "docs" / "results.md").read_text()
    assert doc.startswith("# Results") and "+5.00 ± 10.54" in doc and "2/3 seeds" in doc
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", doc)
    assert links and all((out / "docs" / link).exists() for link in links)  # relative to the document


def test_per_run_figures(sweep, tmp_path, capsys):
    assert main([str(sweep / "3"), "--out", str(tmp_path), "--format", "csv"]) == 0  # run 3: SLICE, seed 1
    runs = tmp_path / "figures" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == [
        "R-relative__s__Slice__seed1.png",
        "R__s__Slice__seed1.png",
        "loss__s__Slice__seed1.png",
    ]
    assert all(is_png(p) for p in runs.iterdir())


def test_metric_curves_when_alpha_and_c_vary(tmp_path, capsys):
    for k, (alpha, c, seed, ap) in enumerate(
        [(1, 0.5, 1, 40.0), (2, 0.5, 1, 50.0), (2, 1.0, 1, 55.0), (2, 1.0, 2, 57.0)]
    ):
        write_run(
            tmp_path / "runs" / str(k),
            seed,
            {"AP": ap, "FP": ap - 20},
            lora__alpha=alpha,
            initializer={"_target_": "x.Slice", "c": c},
        )
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--format", "csv", "--plots", "summary"]) == 0
    figures = tmp_path / "out" / "figures"
    assert sorted(p.name for p in figures.glob("metrics-vs-*.png")) == [
        "metrics-vs-alpha__s.png",  # SLICE c=0.5 at alpha 1 and 2
        "metrics-vs-c__s_lora.alpha_2.png",  # at alpha 2: c 0.5 and 1.0
    ]
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_file())
    assert written == ["report.md", "runs.csv", "summary.csv", "table_paper.csv"]  # csv tables only, and the document


def test_states_pending_failed_missing_are_listed(tmp_path, capsys):
    sweep = tmp_path / "multirun" / "sw"
    write_run(sweep / "0", 1, 60.0)
    write_run(
        sweep / "1",
        2,
        60.0,
        results={"complete": False, "status": "failed: Requeued: requeued after preemption or timeout (exit code 0)"},
    )
    write_run(sweep / "2", 3, 60.0, results={"complete": False, "status": "failed: RuntimeError: CUDA error"})
    write_run(sweep / "3", 4, 60.0, results={"complete": False, "status": "running"})
    write_run(sweep / "4", 5, 60.0, results={"complete": False, "status": "interrupted during stage 2 training"})
    (sweep / "5" / ".hydra").mkdir(parents=True)  # a job that died before its first results.json
    (sweep / "5" / "cl_bench.log").write_text("start\ncl_bench: error: model not found\n")
    (sweep / "multirun.yaml").write_text(
        yaml.safe_dump(
            {
                "hydra": {
                    "sweeper": {
                        "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                        "params": {"seed": "1,2,3,4"},
                    },
                    "overrides": {"task": ["initializer=vanilla,slice"]},
                }
            }
        )
    )  # 4 seeds x 2 methods = 8 jobs, 6 dirs
    assert main([str(tmp_path / "multirun"), "--out", str(tmp_path / "out"), "--plots", "none"]) == 0
    out = capsys.readouterr().out
    assert (
        "7 run(s) not complete, left out of the numbers (3 pending, 1 incomplete, 1 interrupted, 1 failed, 1 missing)"
        in out
    )
    assert re.search(r"pending\s+\S+/1: failed: Requeued", out) and re.search(
        r"failed\s+\S+/2: failed: RuntimeError: CUDA error", out
    )
    assert re.search(r"missing\s+\S+/5: no results.json.*model not found", out)
    assert re.search(r"pending\s+\S+/6: job 6 of 8 has no run dir yet", out) and "/7: job 7 of 8" in out
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert len(runs) == 8 and sorted(runs["state"]) == sorted(
        ["complete", "pending", "failed", "incomplete", "interrupted", "missing", "pending", "pending"]
    )
    assert "## Runs not complete" in (tmp_path / "out" / "report.md").read_text()


def test_a_sweep_with_job_dirs_named_by_overrides_counts_its_missing_jobs(tmp_path, capsys):
    """hydra.sweep.subdir=${hydra.job.override_dirname} (the real_claims presets): no <sweep>/k dirs
    exist, so only the count of missing jobs is reported, not every number as missing."""
    sweep = tmp_path / "multirun" / "sw"
    write_run(sweep / "experiment" / "method=vanilla,seed=1", 1, 60.0)
    write_run(sweep / "experiment" / "method=vanilla,seed=2", 2, 60.0)
    (sweep / "multirun.yaml").write_text(
        yaml.safe_dump(
            {
                "hydra": {
                    "sweep": {"dir": "multirun/sw", "subdir": "${hydra.job.override_dirname}"},
                    "sweeper": {
                        "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                        "params": {"seed": "1,2,3"},
                    },
                    "overrides": {"task": ["experiment/method=vanilla"]},
                }
            }
        )
    )
    assert main([str(tmp_path / "multirun"), "--plots", "none"]) == 0
    out = capsys.readouterr().out
    assert "1 run(s) not complete, left out of the numbers (1 pending)" in out
    assert "1 of the 3 jobs of its last sweep command have no run dir yet" in out and "job 0 of 3" not in out


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    write_run(tmp_path / "r", 1, 60.0)
    assert main([str(tmp_path), "--baseline", "lora_ga"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "cl_bench.report: error: --baseline 'lora_ga' matches no method of the complete runs; valid: Vanilla"
    )
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "--format", "pdf"]) == 2
    assert "--format: unknown pdf; valid: csv, md, tex" in capsys.readouterr().err
    assert main([str(tmp_path), "--markdown", str(tmp_path / "x.md")]) == 2
    assert "--markdown needs --out" in capsys.readouterr().err


# ---- each paper's metric names (--metrics-as) ------------------------------------------------------
# R rows 0..3 (before training, after stages 1..3), tasks 1..3; task 1 peaks at stage 2, after it was learned.
HAND_R = [[10.0, 20.0, 30.0], [60.0, 25.0, 35.0], [75.0, 70.0, 40.0], [40.0, 50.0, 80.0]]
HAND_SIZES = [100, 100, 200]
# the from-scratch scores (mode=independent: row i = the base model trained on task i alone)
SCRATCH_R = [[10.0, 20.0, 30.0], [65.0, None, None], [None, 72.0, None], [None, None, 85.0]]
HAND = {  # paper: {its column: value by hand}
    # AP = (60 + 70 + 80)/3; FP = (40 + 50 + 80)/3; Fgt = AP − FP
    "slice": {"AP": 70.0, "FP": 170 / 3, "Fgt": 70.0 - 170 / 3},
    # Acc = (40·100 + 50·100 + 80·200)/400; AAA = (60 + (75 + 70)/2 + 170/3)/3; BWT = ((40 − 60) + (50 − 70))/2;
    # FWT = ((70 − 72) + (80 − 85))/2 against the from-scratch diagonal; FR = ((60 − 40) + (70 − 50))/2: the peak
    # of task 1 over the stages up to its own (60), not its later 75
    "ps_lora": {"Acc": 62.5, "AAA": (60 + 72.5 + 170 / 3) / 3, "BWT": -20.0, "FWT": -3.5, "FR": 20.0},
    # AP = the mean after the last task; FT = ((75 − 40) + (70 − 50))/2, the peak after learning (ours, FR)
    "gainlora": {"AP": 170 / 3, "FT": 27.5},
    "o_lora": {"AP": 170 / 3, "FT": 27.5},
    "trace": {"OP": 170 / 3, "BWT": -20.0},
}


def _hand_runs(root):
    from cl_bench.evaluation.metrics import compute_cl_metrics, compute_mode_metrics

    tasks = {"sequence__tasks": ["a", "b", "c"]}
    body = {"matrix": HAND_R, "eval_sizes": HAND_SIZES, "tasks": ["a", "b", "c"]}
    write_run(root / "seq", 1, compute_cl_metrics(HAND_R, HAND_SIZES), results=body, **tasks)
    scratch = {"matrix": SCRATCH_R, "eval_sizes": HAND_SIZES, "tasks": ["a", "b", "c"]}
    metrics = compute_mode_metrics(SCRATCH_R, HAND_SIZES, "independent")
    write_run(root / "scratch", 1, metrics, results=scratch, mode="independent", **tasks)


@pytest.mark.parametrize("paper", list(HAND))
def test_metrics_as_prints_and_writes_each_papers_names_from_the_same_matrix(tmp_path, capsys, paper):
    _hand_runs(tmp_path / "runs")
    out = tmp_path / "out"
    assert main([str(tmp_path / "runs"), "--metrics-as", paper, "--out", str(out), "--plots", "none"]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("|") and "method" in line)
    columns = [c.strip() for c in header.strip("|").split("|")][3:]  # block, method, n, then theirs
    assert columns == list(HAND[paper]) + (["GP", "IP"] if paper == "slice" else [])
    table = pd.read_csv(out / f"metrics_as_{paper}.csv")
    row = table[table["method"] == "Vanilla"].iloc[0]
    for column, value in HAND[paper].items():
        assert row[column] == pytest.approx(value, abs=1e-9), (paper, column)
        assert f"{value:.2f}" in printed
    assert (out / f"metrics_as_{paper}.md").exists() and (out / f"metrics_as_{paper}.tex").exists()


def test_metrics_as_unknown_paper_is_a_one_line_error(tmp_path, capsys):
    _hand_runs(tmp_path)
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--metrics-as", "gpm"])
    assert "invalid choice: 'gpm'" in capsys.readouterr().err


def test_the_docs_mapping_section_is_the_code_table():
    """docs/REPRODUCIBILITY.md's 'Each paper's metric names and ours' lists exactly METRICS_AS."""
    from cl_bench.report.paper_names import METRICS_AS
    from helpers import REPO

    documented = set()
    for line in (REPO / "docs" / "REPRODUCIBILITY.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 3 and cells[0].strip("`") in METRICS_AS:
            theirs, ours = (c.split(", ") for c in cells[1:3])
            documented |= {(cells[0].strip("`"), t, o) for t, o in zip(theirs, ours, strict=True)}
    assert documented == {(p, t, o) for p, cols in METRICS_AS.items() for t, o in cols.items()}

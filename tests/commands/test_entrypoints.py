"""Every `python -m cl_bench.<tool>` runs to its end on the tiny model, so that a change of a
signature they call (the runner, its observers, the run dir, the merges) fails here and not at a
user's first stage. Each command is its own process, as from a shell (helpers.run_cli forks it from
a warm server); sizes are the smallest each tool allows. What each command prints and writes in
detail is tested beside its module (tests/commands/test_mine.py, test_data_check.py,
tests/report/, tests/plugins/test_merges.py for remerge, tests/run/test_observers.py for
branch_cost run end to end in process)."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli

pytestmark = pytest.mark.slow

# two synthetic tasks, two optimizer steps a stage, four examples evaluated per task
TINY_RUN = [
    "general_eval=none",
    "progress=false",
    "threads=1",
    "sequence=synthetic",
    "sequence.tasks=[sentiment,parity]",
    "trainer.max_steps=2",
    "sequence.n_train=16",
    "sequence.n_eval=4",
    "evaluation.max_new_tokens=4",
]


def _ok(proc) -> str:
    assert proc.returncode == 0, f"{proc.args[:3]} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """`python -m cl_bench` itself: a finished two-stage run dir."""
    run_dir = tmp_path_factory.mktemp("run")
    _ok(run_cli([*TINY_RUN, f"hydra.run.dir={run_dir}"]))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["complete"] and len(results["matrix"]) == 3
    return run_dir


def test_cl_bench_help():
    out = _ok(run_cli(["--help"]))
    assert "initializer" in out and "regularizer" in out and "merge" in out


def test_remerge_on_a_finished_run(finished_run):
    _ok(run_cli([str(finished_run), "merge=average"], module="cl_bench.remerge"))
    merged = json.loads((finished_run / "results.remerge-average.json").read_text())
    assert len(merged["matrix"]) == 3 and all(v is not None for row in merged["matrix"] for v in row)


def test_report_on_a_finished_run(finished_run, tmp_path):
    _ok(run_cli([str(finished_run), "--out", str(tmp_path), "--plots", "none"], module="cl_bench.report"))
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "report.md").is_file()


def test_data_check_on_an_empty_folder(tmp_path):
    out = _ok(run_cli([f"data.root={tmp_path}"], module="cl_bench.data_check"))
    assert "runnable" in out and "synthetic_conflict" in out  # the embedded sequences need no data


def test_mine_on_a_tiny_pool(tiny_model_dir, tmp_path):
    pool = "has_color,has_color_flip,long_number"
    args = ["--family", "synthetic", "--pool", pool, "--size", "2", "--top-k", "2", "--model", "tiny"]
    _ok(run_cli([*args, "--steps", "1", "--batch-size", "2", "--out", str(tmp_path)], module="cl_bench.mine"))
    assert (tmp_path / "mining.json").is_file() and any((tmp_path / "sequences").glob("*.yaml"))


def test_branch_cost_parses_its_arguments():
    # run end to end (absorb vs gainlora, two stages) by tests/run/test_observers.py
    assert "--merges" in _ok(run_cli(["--help"], module="cl_bench.branch_cost"))


def test_bench_through_the_runner(tiny_model_dir, tmp_path):
    """The bench's one phase that goes through the runner (whole tiny runs, with and without each
    exact option: layout, init cache, row-0 prediction cache, evaluation batching); generated tasks,
    as there is no data folder."""
    out = tmp_path / "bench.json"
    args = ["--model", "tiny", "--repeats", "1", "--threads", "1", "--phases", "exact"]
    _ok(run_cli([*args, "--data-root", str(tmp_path / "none"), "--out", str(out)], module="cl_bench.bench"))
    report = json.loads(out.read_text())
    rows = [r for r in report["rows"] if r.get("phase") == "exactness"]
    assert len(rows) == 9 and all(r["same_matrix"] for r in rows if r.get("reference"))

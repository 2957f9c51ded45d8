"""A multirun rerun that lists its values in another order meets, at job 0, another job's run: the
one line names the sweep dir and the fix, not the single run's advice (another hydra.run.dir)."""

import pytest

from helpers import FAST, run_cli

pytestmark = pytest.mark.slow
TINY = [*FAST, "sequence.tasks=[sentiment]", "trainer.max_steps=1", "evaluation.limit=2"]


def test_a_rerun_with_values_in_another_order_names_the_sweep_dir_and_the_fix(tmp_path, tiny_model_dir):
    sweep = tmp_path / "sweep"
    first = run_cli(["--multirun", *TINY, "seed=1,2", f"hydra.sweep.dir={sweep}"])
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_cli(["--multirun", *TINY, "seed=2,1", f"hydra.sweep.dir={sweep}"])
    errors = [line for line in again.stderr.splitlines() if "error" in line.lower()]
    assert again.returncode == 2 and len(errors) == 1, again.stderr[-3000:]
    line = errors[0]
    assert line.startswith(f"cl_bench: error: sweep dir {sweep}: job 0 ({sweep / '0'}) holds a run with other values")
    assert "seed: 1 -> 2" in line and "the first run's order" in line and "hydra.sweep.dir" in line
    assert "hydra.run.dir" not in line
    resumed = run_cli(["--multirun", *TINY, "seed=1,2", f"hydra.sweep.dir={sweep}"])  # the first order: both done
    assert resumed.returncode == 0, resumed.stderr[-3000:]

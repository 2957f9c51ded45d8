"""Crash safety: SIGKILL at several points, Ctrl-C and SIGTERM (one line, exit 130 / 143), resume,
same final matrix; one writer per run dir; NaN guard; determinism."""

import json
import os
import re

import pytest

from cl_bench.infra.errors import TrainingError
from cl_bench.run.runner import run
from cl_bench.run.store import RunLock
from cl_bench.stage import Regularizer
from helpers import FAST, REPO, compose, run_cli

pytestmark = pytest.mark.slow

ARGS = FAST + ["sequence.tasks=[sentiment,parity]", "sequence=synthetic_conflict", "trainer.checkpoint_every_steps=2"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref")
    proc = run_cli(ARGS + [f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((run_dir / "results.json").read_text())


# Killed mid-training (train:2:4) is the plug-in state test below. The killed runs train their
# stages in another process than the reference, so equal matrices also show same seed, same matrix.
@pytest.mark.parametrize("point", ["eval:2:1", "saved:1"])
def test_sigkill_then_resume_gives_the_same_matrix(reference, tmp_path, point):
    killed = run_cli(ARGS + [f"hydra.run.dir={tmp_path}"], env_extra={"CL_BENCH_KILL_AT": point})
    assert killed.returncode == -9, killed.stderr[-2000:]  # really killed, no cleanup ran
    partial = json.loads((tmp_path / "results.json").read_text())  # valid JSON at every instant
    assert partial["complete"] is False
    if point == "saved:1":  # a resume with another config is refused, naming the key
        other = run_cli(ARGS + [f"hydra.run.dir={tmp_path}", "trainer.lr=1e-4"])
        assert other.returncode == 2 and "trainer.lr" in other.stderr, other.stderr[-2000:]
    resumed = run_cli(ARGS + [f"hydra.run.dir={tmp_path}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = json.loads((tmp_path / "results.json").read_text())
    assert final["complete"] is True
    assert final["matrix"] == reference["matrix"]
    assert [s["train"]["loss_curve"] for s in final["stages"]] == [
        s["train"]["loss_curve"] for s in reference["stages"]
    ]


# Test-only plug-ins (tests/helpers/seam_plugins.py) whose state must be restored on resume: they raise
# if their state disagrees with the run's history, and add nothing to the gradients.
STATEFUL = [
    "regularizer._target_=helpers.seam_plugins.StatefulRegularizer",
    "merge._target_=helpers.seam_plugins.StatefulMerge",
]
PLUGINS_ON_PATH = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)}


def test_plugin_state_and_history_survive_sigkill_mid_stage(reference, tmp_path):
    args = ARGS + STATEFUL + [f"hydra.run.dir={tmp_path}"]
    killed = run_cli(args, env_extra={**PLUGINS_ON_PATH, "CL_BENCH_KILL_AT": "train:2:4"})
    assert killed.returncode == -9, killed.stderr[-2000:]  # really killed, no cleanup ran
    partial = json.loads((tmp_path / "results.json").read_text())  # valid JSON at every instant
    assert partial["complete"] is False
    assert (tmp_path / "stages" / "stage_02" / "checkpoint" / "state.json").exists()
    resumed = run_cli(args, env_extra=PLUGINS_ON_PATH)
    assert resumed.returncode == 0, resumed.stderr[-2000:]  # a lost state raises StateLost
    final = json.loads((tmp_path / "results.json").read_text())
    assert final["matrix"] == reference["matrix"]
    assert [s["train"]["loss_curve"] for s in final["stages"]] == [
        s["train"]["loss_curve"] for s in reference["stages"]
    ]
    # the regularizer's per-step counter came back from the in-stage checkpoint: 6 loss calls per stage
    assert [s["train"]["loss_last"]["calls"] for s in final["stages"]] == [6.0, 6.0]
    stages = tmp_path / "stages"
    assert (stages / "stage_02" / "regularizer.safetensors").exists() and (
        stages / "stage_02" / "merge.safetensors"
    ).exists()
    assert not (stages / "stage_01" / "merge.safetensors").exists()  # only the latest state is kept


def test_ctrl_c_prints_one_line_naming_the_run_dir_then_the_rerun_resumes_to_the_same_matrix(reference, tmp_path):
    # No hydra.run.dir on the command line (the default timestamped dir under the working
    # directory): the line must say which dir to rerun with, and that rerun must resume.
    # SIGTERM takes the same path (exit 143: tests/run/test_summary.py).
    stopped = run_cli(ARGS, cwd=tmp_path, env_extra={"CL_BENCH_KILL_AT": "train:2:4", "CL_BENCH_KILL_SIGNAL": "INT"})
    assert stopped.returncode == 130, stopped.stderr[-2000:]  # a real SIGINT, handled: 128 + 2
    (line,) = stopped.stderr.strip().splitlines()
    match = re.fullmatch(
        r"cl_bench: interrupted during stage 2 step 4 \(training parity\); "
        r"rerun the same command with (hydra.run.dir=\S+) to resume",
        line,
    )
    assert match, line
    run_dir = tmp_path / match.group(1).split("=", 1)[1]
    partial = json.loads((run_dir / "results.json").read_text())
    assert partial["complete"] is False and partial["status"].startswith("interrupted during stage 2 step 4")
    assert (run_dir / "stages" / "stage_02" / "checkpoint" / "state.json").exists()
    resumed = run_cli([*ARGS, match.group(1)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = json.loads((run_dir / "results.json").read_text())
    assert final["matrix"] == reference["matrix"]
    assert [s["train"]["loss_curve"] for s in final["stages"]] == [
        s["train"]["loss_curve"] for s in reference["stages"]
    ]


def test_second_process_on_the_same_run_dir_is_refused(tiny_model_dir, tmp_path):
    with RunLock(tmp_path):  # this test process holds the dir, as a running job would
        proc = run_cli(ARGS + [f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 2
    assert "in use by pid" in proc.stderr and "Traceback" not in proc.stderr


class NanAfter(Regularizer):
    """A regularizer whose term turns NaN at the given step: forces the NaN guard."""

    def __init__(self, step: int = 2):
        self.step, self.calls = step, 0

    def loss(self, model, batch, ctx):
        import torch

        self.calls += 1
        return {"poison": torch.tensor(float("nan") if self.calls >= self.step else 0.0)}


def test_nan_loss_stops_the_stage_and_keeps_finished_ones(tiny_model_dir, tmp_path):
    cfg = compose(
        FAST
        + ["sequence.tasks=[sentiment,parity]", "regularizer._target_=test_reliability.NanAfter", "+regularizer.step=8"]
    )
    with pytest.raises(TrainingError, match="non-finite loss.*poison"):
        run(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["complete"] is False and "non-finite" in results["status"]
    assert len(results["stages"]) == 1 and results["matrix"][1][0] is not None  # stage 1 kept
    assert (tmp_path / "stages" / "stage_01" / "adapter.safetensors").exists()


def test_a_resumed_stage_continues_from_the_init_it_started_with(tmp_path):
    """An in-stage resume runs the init again; where the recomputed (A0', B0') differ by rounding
    (another number of ranks or threads: the SVD of the capture amplifies it), the checkpointed
    adapter trained from the saved (A0, B0). Before begin_stage the runner folds the difference
    (W = W_prev − s·B0·A0) and puts (A0, B0) back in the adapter."""
    from types import SimpleNamespace

    import torch

    from cl_bench.infra.files import atomic_save_tensors
    from cl_bench.lora.layers import WeightMaster, base_weight, lora_layers
    from cl_bench.lora.task_vectors import lora_delta
    from cl_bench.run.runner import Runner
    from cl_bench.run.store import RunStore, factors_to_tensors
    from helpers.small import TARGETS
    from helpers.small import small_llama as _llama

    model = _llama()
    layers = lora_layers(model, "stage_01")
    w_prev = {n: base_weight(layer).detach().clone() for n, layer in layers.items()}
    gen = torch.Generator().manual_seed(0)
    saved, recomputed = {}, {}
    for n, layer in layers.items():
        A, B = (
            torch.randn(layer.lora_A["stage_01"].weight.shape, generator=gen),
            torch.randn(layer.lora_B["stage_01"].weight.shape, generator=gen),
        )
        saved[n] = (A, B)
        recomputed[n] = (A + 1e-2 * torch.randn(A.shape, generator=gen), B + 1e-2 * torch.randn(B.shape, generator=gen))
    master = WeightMaster.attach(model, TARGETS)
    for n, (A, B) in recomputed.items():  # what start_adapter folded on the resume
        master.fold_(n, layers[n], -lora_delta(A, B, float(layers[n].scaling["stage_01"])))
    for n, (A, B) in recomputed.items():
        layers[n].lora_A["stage_01"].weight.data.copy_(A)
        layers[n].lora_B["stage_01"].weight.data.copy_(B)
    store = RunStore(tmp_path)
    files = store.stage(1)
    files.checkpoint.mkdir(parents=True)
    atomic_save_tensors(files.checkpoint / "init.safetensors", factors_to_tensors(saved))
    (files.checkpoint / "state.json").write_text("{}")  # a complete checkpoint
    runner = Runner.__new__(Runner)
    runner.master, runner.store = master, store
    ctx = SimpleNamespace(stage=1, adapter="stage_01", device=torch.device("cpu"))
    out = runner.checkpointed_init(model, ctx, recomputed)
    for n, layer in layers.items():
        assert torch.equal(out[n][0], saved[n][0]) and torch.equal(out[n][1], saved[n][1])
        # the adapter holds the saved init again, for begin_stage (InfLoRA's A, GainLoRA's companion)
        assert torch.equal(layer.lora_A["stage_01"].weight, saved[n][0]) and torch.equal(
            layer.lora_B["stage_01"].weight, saved[n][1]
        )
        expected = w_prev[n] - lora_delta(*saved[n], float(layer.scaling["stage_01"]))
        torch.testing.assert_close(base_weight(layer).detach(), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(
            base_weight(layer).detach(),
            w_prev[n] - lora_delta(*recomputed[n], float(layer.scaling["stage_01"])),
            atol=1e-4,
        )
    (files.checkpoint / "state.json").unlink()  # no complete checkpoint: the stage starts over from the recomputed init
    assert runner.checkpointed_init(model, ctx, recomputed) is recomputed
    (files.checkpoint / "state.json").write_text("{}")
    (files.checkpoint / "init.safetensors").unlink()  # a checkpoint from before inits were saved: kept as recomputed
    assert runner.checkpointed_init(model, ctx, recomputed) is recomputed

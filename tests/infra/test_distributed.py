"""distributed=ddp|fsdp: the arithmetic of data parallelism in-process (a step's and a
capture's rank shares add up to the one-process gradient; the sharded capture's activation-side
gradient is the weight gradient; row shards of a model state go back together), then real 2-process
torchrun jobs (gloo, CPU) of each kind, killed with SIGKILL mid-stage-2 and resumed, against one process.

The e2e job is vanilla: there every difference is float summation order, so loss curves and task
vectors must agree tightly. SVD-based inits (slice, lora_ga) amplify rounding differences through
near-equal singular values (a one-process run with trainer.layout=pad vs group diverges as much as
2 ranks vs 1), so their equality is a measured number in the README, not a tight assertion here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cl_bench.infra.distributed import Dist
from cl_bench.infra.errors import ConfigError
from cl_bench.stage import Regularizer
from cl_bench.train.layouts import Layout
from cl_bench.train.loss import trained_tokens
from cl_bench.train.trainer import _forward_backward
from helpers import FAST, REPO, compose
from helpers.small import TARGETS
from helpers.small import random_examples as _examples
from helpers.small import small_llama as _llama
from helpers.small import stage_context as _ctx


def _rank(rank: int, world: int) -> Dist:
    d = Dist()
    d.rank, d.world = rank, world
    return d


def test_rank_shares_of_a_step_average_to_the_single_process_gradient():
    """What DDP computes: each rank's loss is its share's token sum / the whole step's tokens x world;
    the mean of the ranks' gradients is then the one-process step gradient (up to float order)."""
    model = _llama()
    examples = _examples(10)
    layout = Layout("group", overhead_tokens=4)
    one = layout.micro_batches([examples], 0, batch_size=10, max_len=24)
    n = sum(int(trained_tokens(b)) for b in one)
    model.zero_grad(set_to_none=True)
    terms, _ = _forward_backward(model, one, n, Regularizer(), _ctx(len(one)), autocast=False, where="t")
    single = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    shares = [_rank(r, 2).shard(examples) for r in range(2)]
    assert sorted(map(id, shares[0] + shares[1])) == sorted(map(id, examples)) and not set(map(id, shares[0])) & set(
        map(id, shares[1])
    )
    mean: dict[str, torch.Tensor] = {}
    lm = 0.0
    for share in shares:
        micro = layout.micro_batches([share], 0, batch_size=10, max_len=24)
        model.zero_grad(set_to_none=True)
        t, _ = _forward_backward(model, micro, n, Regularizer(), _ctx(len(micro)), autocast=False, where="t", world=2)
        lm += float(t["lm"])
        for k, p in model.named_parameters():
            if p.requires_grad:
                mean[k] = mean.get(k, 0) + p.grad / 2
    assert lm == pytest.approx(float(terms["lm"]), rel=1e-6)  # the logged lm: the ranks' shares summed
    for k in single:
        torch.testing.assert_close(mean[k], single[k], rtol=1e-5, atol=1e-7)


def test_passes_that_keep_a_sharded_rank_in_step_add_nothing():
    """distributed=fsdp: a rank with fewer micro-batches than the busiest runs `idle` filler passes
    (forward and backward: FSDP gathers weights in both); the gradient and logged terms are unchanged."""
    model = _llama()
    micro = Layout("group", overhead_tokens=4).micro_batches([_examples(10)], 0, batch_size=10, max_len=24)
    n = sum(int(trained_tokens(b)) for b in micro)
    grads, logged = [], []
    for idle in (0, 2):
        model.zero_grad(set_to_none=True)
        terms, finite = _forward_backward(
            model, micro, n, Regularizer(), _ctx(len(micro)), autocast=False, where="t", idle=idle
        )
        assert bool(finite)
        logged.append(float(terms["lm"]))
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    assert logged[0] == logged[1]
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k])


def test_rank_shares_of_a_capture_add_up_to_the_single_process_gradient(monkeypatch):
    """Each rank runs every world-th forward pass of the capture, divided by the trained tokens of all
    of them; the all-reduce (here: the sum of the two ranks' results) gives the one-process gradient."""
    from cl_bench.data.prompts import collate_training
    from cl_bench.initializers.capture import capture_gradients
    from cl_bench.lora.layers import base_weight, lora_layers

    model = _llama()
    weights = {n: base_weight(layer) for n, layer in lora_layers(model, "stage_01").items()}
    examples = _examples(12)
    batches = [collate_training(examples[i : i + 3], 0) for i in range(0, 12, 3)]
    single = capture_gradients(model, weights, batches)
    shares = [
        capture_gradients(model, weights, batches, dist=_rank(r, 2)) for r in range(2)
    ]  # no process group: no reduce
    assert shares[0].info["forward_passes"] == single.info["forward_passes"] > 1
    for n, g in single.grads.items():
        torch.testing.assert_close(shares[0].grads[n] + shares[1].grads[n], g, rtol=1e-5, atol=1e-7)
    assert shares[0].loss + shares[1].loss == pytest.approx(single.loss, rel=1e-6)


class _ShardedRank:
    """What a sharded capture asks of distributed.Dist, without a process group: rank `rank` of
    `world`, the busiest rank running `busiest` passes, no reduction (the test adds the shares)."""

    sharded = True

    def __init__(self, rank: int = 0, world: int = 1, busiest: int = 0):
        self.rank, self.world, self.busiest = rank, world, busiest

    def shard(self, items):
        return list(items[self.rank :: self.world])

    def max_over_ranks(self, n, what):
        return max(n, self.busiest)

    def all_reduce_(self, tensors, what="", op="sum"):
        return None


def test_the_sharded_capture_reads_the_weight_gradient_off_inputs_and_output_gradients():
    """distributed=fsdp: ∂L/∂W = Σ g_yᵀ·x from hooks (a sharded weight gets no gradient) equals the
    weight-gradient capture; rank shares add up; passes that only keep a rank in step add nothing;
    no parameter (adapter or base) is left with a gradient."""
    from cl_bench.data.prompts import collate_training
    from cl_bench.initializers.capture import capture_gradients
    from cl_bench.lora.layers import base_weight, lora_layers

    model = _llama()
    weights = {n: base_weight(layer) for n, layer in lora_layers(model, "stage_01").items()}
    examples = _examples(12)
    batches = [collate_training(examples[i : i + 3], 0) for i in range(0, 12, 3)]
    single = capture_gradients(model, weights, batches)
    hooked = capture_gradients(model, weights, batches, dist=_ShardedRank())
    shares = [
        capture_gradients(model, weights, batches, dist=_ShardedRank(r, 2, busiest=5)) for r in range(2)
    ]  # 2 + 3 idle passes
    assert hooked.loss == pytest.approx(single.loss, rel=1e-6) and shares[0].loss + shares[1].loss == pytest.approx(
        single.loss, rel=1e-6
    )
    for n, g in single.grads.items():
        assert float(g.norm()) > 0
        torch.testing.assert_close(hooked.grads[n], g, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(shares[0].grads[n] + shares[1].grads[n], g, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())
    assert any(p.requires_grad for p in model.parameters())  # the adapter's flags are given back


def test_ewc_fisher_of_sharded_weights_from_hooks_equals_the_weight_gradient_fisher(monkeypatch):
    """distributed=fsdp: EWC's per-example Fisher of a sharded W is squared from the hooks' gradient
    (weight_grads.py); here every Parameter passes for a DTensor, so the hook path runs in-process."""
    import torch.distributed.tensor

    from cl_bench.data.prompts import collate_training
    from cl_bench.lora.layers import base_weight, lora_layers
    from cl_bench.regularizers.ewc import empirical_fisher

    model = _llama()
    weights = {n: base_weight(layer) for n, layer in lora_layers(model, "stage_01").items()}
    batches = [collate_training([e], 0) for e in _examples(4)]
    plain = empirical_fisher(model, weights, batches)
    monkeypatch.setattr(torch.distributed.tensor, "DTensor", torch.nn.Parameter)
    hooked = empirical_fisher(model, weights, batches)
    for n, f in plain.items():
        assert float(f.sum()) > 0
        torch.testing.assert_close(hooked[n], f, rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())


def test_row_shards_of_a_model_state_go_back_together_for_any_number_of_ranks(tmp_path):
    """distributed=fsdp saves rank k's rows [k·c, (k+1)·c), c = ⌈d/N⌉, per file plus an index; a resume
    with any number of processes rebuilds each whole weight and takes its own rows."""
    from cl_bench.infra.files import atomic_save_tensors
    from cl_bench.lora.layers import WeightMaster, local_rows, target_linears
    from cl_bench.run.store import StageFiles, load_model_state, save_model_state_index

    source, target = _llama(seed=0), _llama(seed=7)
    whole = {f"{n}.weight": lin.weight.detach().clone() for n, lin in target_linears(source, TARGETS).items()}
    files = StageFiles(tmp_path, 1)
    files.dir.mkdir(parents=True)
    for k in range(3):  # 16 rows over 3 ranks: 6, 6, 4
        atomic_save_tensors(files.model_state_shard(k, 3), {n: w[6 * k : 6 * k + 6] for n, w in whole.items()})
    save_model_state_index(files, 3)
    load_model_state(files, target, TARGETS, WeightMaster.attach(target, TARGETS))
    for n, lin in target_linears(target, TARGETS).items():
        assert torch.equal(lin.weight, whole[f"{n}.weight"])
        assert local_rows(lin.weight)[1] == slice(None)  # a plain weight is its own block
    files.model_state_shard(2, 3).unlink()
    with pytest.raises(ConfigError, match="saved by 3 ranks.*rank-02-of-03"):
        load_model_state(files, target, TARGETS, WeightMaster.attach(target, TARGETS))


@pytest.mark.parametrize(
    "overrides, refused",
    [
        ([], None),
        (["initializer=slice", "regularizer=gpm"], None),
        (["merge=ties", "merge.train_on=merged"], None),
        (["regularizer=ewc"], None),
        (["initializer=pissa"], "initializer=pissa"),
        (["merge=ties"], "merge=ties"),
        (["merge=gainlora"], "merge=gainlora"),
    ],
)
def test_fsdp_refuses_at_start_the_plugins_that_need_whole_weights(overrides, refused):
    from cl_bench.run.runner import build_plugins

    cfg = compose(overrides)
    dist = Dist()
    dist.kind, dist.on = "fsdp", True
    if refused is None:
        dist.check_plugins(build_plugins(cfg), cfg)
    else:
        with pytest.raises(ConfigError, match=f"{refused} does not run with distributed=fsdp"):
            dist.check_plugins(build_plugins(cfg), cfg)


def test_a_multi_process_launch_needs_distributed_ddp(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="distributed=ddp"):
        Dist.from_config({"kind": "none"})
    with pytest.raises(ConfigError, match="distributed.kind='fsdp2'"):
        Dist.from_config({"kind": "fsdp2"})
    monkeypatch.delenv("WORLD_SIZE")
    assert Dist.from_config({"kind": "none"}).world == 1
    with pytest.raises(
        ConfigError, match="distributed=fsdp was started as one process"
    ):  # e.g. accelerate without --multi_gpu
        Dist.from_config({"kind": "fsdp"})


def test_slurm_tasks_count_as_ranks_only_for_distributed_ddp(monkeypatch):
    """srun / submitit with tasks_per_node x nodes tasks: N ranks; a plain sbatch --ntasks script that
    runs one process with distributed=none stays one process."""
    from cl_bench.infra.distributed import launched_world_size

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in dict(SLURM_JOB_ID="7", SLURM_NTASKS="8", SLURM_STEP_ID="0", SLURM_PROCID="5").items():
        monkeypatch.setenv(k, v)
    assert launched_world_size(slurm=True) == 8 and launched_world_size(slurm=False) == 1
    assert Dist.from_config({"kind": "none"}).world == 1


# One short job: 2 tasks (the second undoes the first), a checkpoint every 2 steps so the kill lands
# between checkpoints.
JOB = [
    *FAST,
    "sequence=synthetic_conflict",
    "sequence.tasks=[parity,parity_flip]",
    "initializer=vanilla",
    "trainer.max_steps=4",
    "trainer.checkpoint_every_steps=2",
    "threads=1",
]


def _torchrun(run_dir, env_extra=None, kind="ddp") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "cl_bench",
        f"distributed={kind}",
        *JOB,
        f"hydra.run.dir={run_dir}",
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    from cl_bench.run.runner import run

    base = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    single = run(compose(JOB), base / "one")
    killed = _torchrun(base / "two", {"CL_BENCH_KILL_AT": "train:2:3"})  # every rank SIGKILLs itself there
    after_kill = {
        "rc": killed.returncode,
        "stderr": killed.stderr,
        "checkpoint": (base / "two" / "stages" / "stage_02" / "checkpoint").is_dir(),
        "results": json.loads((base / "two" / "results.json").read_text()),
    }
    resumed = _torchrun(base / "two")
    return base, single, after_kill, resumed


def test_kill9_mid_stage2_then_rerun_gives_the_single_process_matrix(runs):
    base, single, after_kill, resumed = runs
    assert after_kill["rc"] != 0 and "SIGKILL" in after_kill["stderr"]
    assert after_kill["checkpoint"] and len(after_kill["results"]["stages"]) == 1  # stage 1 safe, stage 2 mid-way
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    two = json.loads((base / "two" / "results.json").read_text())
    assert two["complete"] and two["matrix"] == single["matrix"]  # exact
    # Order-dependent sums (the step gradient over 2 ranks): equal up to float rounding; the curve
    # is stored to 5 decimals, so a value near a rounding boundary may move by one unit (1e-5).
    for a, b in zip(single["stages"], two["stages"]):
        assert b["train"]["loss_curve"] == pytest.approx(a["train"]["loss_curve"], rel=0, abs=2e-5)
    assert two["stages"][0]["train"]["throughput"]["examples"] == single["stages"][0]["train"]["throughput"]["examples"]
    for stage in ("stage_01", "stage_02"):  # the trained factors (A random from the stage seed, B from 0)
        one_ad = load_file(str(base / "one" / "stages" / stage / "adapter.safetensors"))
        two_ad = load_file(str(base / "two" / "stages" / stage / "adapter.safetensors"))
        for k in one_ad:
            torch.testing.assert_close(two_ad[k], one_ad[k], rtol=1e-4, atol=1e-5)
    # Row 0 (same weights, same generation batches): identical predictions, gathered in order.
    for task in two["tasks"]:
        p1 = (base / "one" / "predictions" / "stage_00" / f"{task}.jsonl").read_text()
        assert (base / "two" / "predictions" / "stage_00" / f"{task}.jsonl").read_text() == p1


def test_rank0_writes_the_files_and_rank1_only_its_log(runs):
    base, _, _, resumed = runs
    two = base / "two"
    assert (two / "cl_bench_rank1.log").is_file() and (two / "cl_bench.log").is_file()
    assert "resuming after stage 1" in (two / "cl_bench_rank1.log").read_text()  # rank 1 read the same files
    assert "results matrix" in resumed.stdout and resumed.stdout.count("results matrix") == 1  # one summary: rank 0's


@pytest.fixture(scope="module")
def fsdp_run(runs):
    """The same job with the frozen base sharded over 2 ranks, killed mid-stage-2 and rerun."""
    base = runs[0]
    killed = _torchrun(base / "fsdp", {"CL_BENCH_KILL_AT": "train:2:3"}, kind="fsdp")
    state = sorted(p.name for p in (base / "fsdp" / "stages" / "stage_01").glob("model_state*"))
    resumed = _torchrun(base / "fsdp", kind="fsdp")
    return killed, state, resumed


def test_fsdp_kill9_mid_stage2_then_rerun_gives_the_single_process_matrix(runs, fsdp_run):
    base, single = runs[0], runs[1]
    killed, state, resumed = fsdp_run
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    # stage 1's model state: each rank's rows and the index that marks it saved
    assert state == [
        "model_state.rank-00-of-02.safetensors",
        "model_state.rank-01-of-02.safetensors",
        "model_state.safetensors",
    ]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "fsdp: 4 blocks (LlamaDecoderLayer) sharded over 2 ranks" in (base / "fsdp" / "cl_bench.log").read_text()
    assert (
        "built on the meta device, its weights come from rank 0" in (base / "fsdp" / "cl_bench_rank1.log").read_text()
    )
    sharded = json.loads((base / "fsdp" / "results.json").read_text())
    assert sharded["complete"] and sharded["matrix"] == single["matrix"]  # exact
    for a, b in zip(single["stages"], sharded["stages"]):
        assert b["train"]["loss_curve"] == pytest.approx(a["train"]["loss_curve"], rel=0, abs=2e-5)
    # the final weights: the rows of both ranks put together = one process's folded weights
    one_state = load_file(str(base / "one" / "stages" / "stage_02" / "model_state.safetensors"))
    parts = [
        load_file(str(base / "fsdp" / "stages" / "stage_02" / f"model_state.rank-{k:02d}-of-02.safetensors"))
        for k in range(2)
    ]
    for k, w in one_state.items():
        assert parts[0][k].shape[0] == -(-w.shape[0] // 2)
        # float summation order of 2 ranks vs 1 over 2 x 6 trained steps: a few 1e-6 (README, Scaling out)
        torch.testing.assert_close(torch.cat([parts[0][k], parts[1][k]]), w, rtol=1e-5, atol=5e-6)
    for task in sharded["tasks"]:  # row 0: same weights, same batches (rank 1 ran a filler batch): same text
        p1 = (base / "one" / "predictions" / "stage_00" / f"{task}.jsonl").read_text()
        assert (base / "fsdp" / "predictions" / "stage_00" / f"{task}.jsonl").read_text() == p1

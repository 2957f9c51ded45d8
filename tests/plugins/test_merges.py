"""Merges: the pure functions on hand-worked tensors and against PEFT's merge_utils; the merge
plug-ins' train and eval models (with an absorbed init, fp32 and bf16) and their rebuild on resume."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.utils import merge_utils as peft

from cl_bench.infra.errors import ConfigError
from cl_bench.initializers.base import InitResult
from cl_bench.lora import task_vectors as merges
from cl_bench.lora.layers import (
    WeightMaster,
    adapter_factors,
    add_adapter,
    apply_init,
    lora_layers,
    lora_scaling,
    set_scaling,
    target_linears,
)
from cl_bench.mergers.absorb import Absorb
from cl_bench.mergers.average import Average
from cl_bench.mergers.dare import Dare
from cl_bench.mergers.magmax import MagMax
from cl_bench.mergers.task_arithmetic import TaskArithmetic
from cl_bench.mergers.ties import Ties
from cl_bench.run.store import StageFiles, load_model_state, load_plugin_state, save_model_state, save_plugin_state
from cl_bench.stage import History, StageContext, StageRecord, adapter_name
from helpers.small import tiny_llama

T = torch.tensor
# Three task vectors of one 2×2 module, magnitudes distinct within each (no ties in any top-k).
TAU1 = T([[4.0, -1.0], [0.5, 2.0]])
TAU2 = T([[-3.0, 2.0], [1.0, -0.25]])
TAU3 = T([[-2.0, 3.0], [-0.125, 1.0]])
TAUS = [TAU1, TAU2, TAU3]


def _random_taus(n=3, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


# ------------------------------------------------------------------ task arithmetic, average
def test_task_arithmetic_and_average_by_hand_and_as_peft():
    total = T([[-1.0, 4.0], [1.375, 2.75]])  # τ1 + τ2 + τ3
    assert torch.equal(merges.task_sum(TAUS), total)
    assert torch.equal(merges.task_arithmetic(TAUS, 0.5), 0.5 * total)
    torch.testing.assert_close(merges.average(TAUS), total / 3, rtol=0, atol=1e-7)
    assert torch.equal(merges.average([TAU2]), TAU2)  # one stage: the stage itself, exactly
    taus = _random_taus()
    assert torch.equal(merges.task_arithmetic(taus, 0.7), peft.task_arithmetic(taus, torch.full((3,), 0.7)))
    with pytest.raises(ValueError, match="shape"):
        merges.task_sum([TAU1, torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="at least one"):
        merges.average([])


# ------------------------------------------------------------------ TIES
def test_ties_trims_elects_and_takes_the_disjoint_mean_by_hand():
    # density 0.5 keeps 2 of 4 per task vector: τ̂1 = [[4,0],[0,2]], τ̂2 = [[-3,2],[0,0]], τ̂3 = [[-2,3],[0,0]]
    # Σ τ̂ = [[-1,5],[0,2]] → signs [[-,+],[+ (sum 0),+]]; agreeing means: -2.5, 2.5, none → 0, 2
    assert torch.equal(merges.ties(TAUS, density=0.5, lam=2.0), T([[-5.0, 5.0], [0.0, 4.0]]))
    # density 1 keeps all: Σ τ = [[-1,4],[1.375,2.75]] → signs [[-,+],[+,+]]
    # means over agreeing entries: (-3-2)/2, (2+3)/2, (0.5+1)/2, (2+1)/2
    assert torch.equal(merges.ties(TAUS, density=1.0), T([[-2.5, 2.5], [0.75, 1.5]]))
    # sign by count ("frequency"): (0,0) has one + and two −; (1,0) two + one −: same as total here,
    # but (0,1): τ1 −1 vs τ2, τ3 positive → + either way; check a case where the two differ:
    a, b, c = T([[10.0]]), T([[-1.0]]), T([[-1.0]])
    assert torch.equal(merges.ties([a, b, c], 1.0, sign="total"), T([[10.0]]))  # summed magnitude: +
    assert torch.equal(merges.ties([a, b, c], 1.0, sign="frequency"), T([[-1.0]]))  # two of three: −


def test_ties_is_peft_ties():
    taus = _random_taus(shape=(8, 7))
    ours = merges.ties(taus, density=0.3, lam=1.5, sign="total")
    assert torch.equal(ours, peft.ties(taus, torch.full((3,), 1.5), 0.3, "total"))
    # and PEFT's primitives, composed as Yadav et al. Algorithm 1
    trimmed = torch.stack([peft.magnitude_based_pruning(t, 0.3) for t in taus])
    mask = peft.calculate_majority_sign_mask(trimmed, "total")
    torch.testing.assert_close(ours, 1.5 * peft.disjoint_merge(trimmed, mask), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ DARE
def test_dare_prune_drops_and_rescales_reproducibly_as_peft_random_pruning():
    tau = torch.randn(40, 50, generator=torch.Generator().manual_seed(1))
    state = torch.get_rng_state()
    pruned = merges.dare_prune(tau, 0.75, seed=123)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    kept = pruned != 0
    assert torch.equal(pruned[kept], tau[kept] * 4.0)  # rescaled by 1/(1 − p)
    assert 0.2 < kept.float().mean() < 0.3  # ≈ 1 − p of 2000 entries
    assert torch.equal(merges.dare_prune(tau, 0.75, seed=123), pruned)  # same seed, same mask
    assert not torch.equal(merges.dare_prune(tau, 0.75, seed=124), pruned)
    torch.manual_seed(123)
    assert torch.equal(pruned, peft.random_pruning(tau, 0.25, rescale=True))  # PEFT's draw under the seed
    assert torch.equal(merges.dare_prune(tau, 0.0, seed=5), tau)  # p = 0 drops nothing
    with pytest.raises(ValueError, match="p="):
        merges.dare_prune(tau, 1.0, seed=0)


def test_dare_combines_as_peft_and_seeds_each_stage():
    # p = 0: DARE + task arithmetic is task arithmetic; DARE + TIES is TIES without the trim
    assert torch.equal(merges.dare(TAUS, 0.0, [1, 2, 3], lam=0.5), merges.task_arithmetic(TAUS, 0.5))
    assert torch.equal(merges.dare(TAUS, 0.0, [1, 2, 3], combine="ties"), T([[-2.5, 2.5], [0.75, 1.5]]))
    tau = _random_taus(1, (30, 20))[0]
    torch.manual_seed(7)
    assert torch.equal(merges.dare([tau], 0.6, [7], lam=2.0), peft.dare_linear([tau], torch.tensor([2.0]), 0.4))
    torch.manual_seed(7)
    assert torch.equal(merges.dare([tau], 0.6, [7], combine="ties"), peft.dare_ties([tau], torch.tensor([1.0]), 0.4))
    # each τ_i keeps its own mask whatever it is merged with: the merge of stages 1..t is stable in t
    t1, t2 = _random_taus(2, (30, 20), seed=3)
    both = merges.dare([t1, t2], 0.5, [11, 22])
    assert torch.equal(both, merges.dare_prune(t1, 0.5, 11) + merges.dare_prune(t2, 0.5, 22))
    assert (
        merges.dare_seed(42, 2, "m.q_proj")
        == merges.dare_seed(42, 2, "m.q_proj")
        != merges.dare_seed(42, 3, "m.q_proj")
    )


# ------------------------------------------------------------------ MagMax (PS-LoRA Eq. 5)
def test_magmax_keeps_the_larger_magnitude_later_stage_on_ties_by_hand():
    t1 = T([[1.0, -3.0], [2.0, 0.5]])
    t2 = T([[-2.0, 1.0], [-2.0, -0.1]])
    t3 = T([[0.5, 3.0], [1.0, 0.4]])
    # (0,0): |−2| largest; (0,1): |−3| = |3| → the later, 3; (1,0): |2| = |−2| → the later, −2; (1,1): 0.5
    expected = T([[-2.0, 3.0], [-2.0, 0.5]])
    assert torch.equal(merges.magmax([t1, t2, t3]), expected)
    # Eq. 5 applied recursively: ΔW_[1:3] = M(M(ΔW_1, ΔW_2), ΔW_3)
    M = lambda x, y: torch.where(y.abs() >= x.abs(), y, x)  # noqa: E731
    assert torch.equal(merges.magmax([t1, t2, t3]), M(M(t1, t2), t3))
    assert torch.equal(merges.magmax([t1]), t1)


def test_magmax_as_marczak_et_al_define_it_takes_the_largest_cumulative_task_vector_by_hand():
    """MagMax (ECCV 2024): the task vectors of sequential fine-tuning are θ_i − θ_0 = τ_1 + ... + τ_i.
    τ = [1, −2], [−3, 1], [1, 2]: cumulative [1, −2], [−2, −1], [−1, 1] → per entry the largest
    |value|: [−2, −2]. PS-LoRA's per-stage form over the τ_i themselves: [−3, 2] (2 ties −2: the later)."""
    taus = [T([[1.0, -2.0]]), T([[-3.0, 1.0]]), T([[1.0, 2.0]])]
    assert torch.equal(merges.magmax(taus, "cumulative"), T([[-2.0, -2.0]]))
    assert torch.equal(merges.magmax(taus, "per_stage"), T([[-3.0, 2.0]]))
    assert torch.equal(merges.magmax(taus), merges.magmax(taus, "per_stage"))  # the default: PS-LoRA's
    assert torch.equal(MagMax(vectors="cumulative").merge(taus, [1, 2, 3], "m"), T([[-2.0, -2.0]]))
    with pytest.raises(ConfigError, match="merge.vectors='sum'.*per_stage, cumulative"):
        MagMax(vectors="sum")


ONE_STAGE = {  # every task-vector merge, with knobs that would change a lone τ_1
    "ties": lambda: Ties(density=0.2),
    "dare": lambda: Dare(p=0.9, seed=3),
    "task_arithmetic": lambda: TaskArithmetic(lam=0.5),
    "average": Average,
    "magmax_cumulative": lambda: MagMax(vectors="cumulative"),
}


@pytest.mark.parametrize("name", list(ONE_STAGE))
def test_a_merge_of_one_task_vector_is_the_identity_and_merges_from_stage_2(name):
    """After stage 1 there is nothing to merge: the evaluated (and, train_on=merged, trained) model is
    W0 + τ_1 under every merge (TIES at density 0.2 would otherwise score R[1,1] on a trimmed τ_1)."""
    taus = _random_taus(2)
    records = [
        StageRecord(i + 1, f"t{i}", adapter_name(i + 1), lambda t=t: ({"m": (torch.eye(5), t)}, None, {"m": 1.0}))
        for i, t in enumerate(taus)
    ]
    merge = ONE_STAGE[name]()
    tau1 = records[0].task_vector("m")
    assert torch.equal(merge.eval_delta(records[:1], "m"), tau1)
    merge.train_on = "merged"
    assert torch.equal(merge.train_delta(records[:1], "m"), tau1)
    both = [r.task_vector("m") for r in records]
    assert torch.equal(merge.eval_delta(records, "m"), merge.merge(both, [1, 2], "m"))
    assert not torch.allclose(merge.eval_delta(records, "m"), both[0] + both[1])  # a merge from t = 2
    if name in ("ties", "dare", "task_arithmetic"):  # as written, X would change a lone τ_1
        assert not torch.equal(merge.merge([tau1], [1], "m"), tau1)


def test_knobs_are_checked_with_one_line_errors():
    for build, key in [
        (lambda: Ties(density=0.0), "merge.density"),
        (lambda: Ties(sign="mean"), "merge.sign"),
        (lambda: Dare(p=1.0), "merge.p"),
        (lambda: Dare(combine="sum"), "merge.combine"),
        (lambda: TaskArithmetic(lam="big"), "merge.lam"),
        (lambda: MagMax(train_on="eval"), "merge.train_on"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            build()


# ------------------------------------------------------------------ the plug-ins' two models
TARGETS = ["q_proj", "v_proj"]


def _llama(dtype=torch.float32):
    return tiny_llama(dtype=dtype)


def _ctx(stage, history, master):
    return StageContext(
        stage=stage,
        current=None,
        previous=[],
        tasks=[None],
        rank=2,
        alpha=4.0,
        scaling=lora_scaling(4, 2, "rslora"),
        target_modules=TARGETS,
        device=torch.device("cpu"),
        seed=stage,
        make_batches=None,
        adapter=adapter_name(stage),
        history=history,
        master=master,
    )


def _stages(merge, dtype=torch.float32, n=2):
    """n stages of the runner's consolidate path on a small Llama: stage 1 absorbs a random init
    (W ← W − s·B0·A0), each stage 'trains' to random factors. Returns the models, W0, history, master."""
    model = _llama(dtype)
    master = WeightMaster.attach(model, TARGETS)
    w0 = {n_: lin.weight.detach().float().clone() for n_, lin in target_linears(model, TARGETS).items()}
    history, train = History(), model
    g = torch.Generator().manual_seed(5)
    for stage in range(1, n + 1):
        name = adapter_name(stage)
        peft_model = add_adapter(train, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, use_rslora=True), name)
        s = set_scaling(peft_model, name, "rslora")
        init = None
        if stage == 1:
            factors = {m: (0.3 * torch.randn(2, 16, generator=g), 0.3 * torch.randn(16, 2, generator=g)) for m in s}
            apply_init(peft_model, InitResult(factors=factors, absorb=True), name, master)
            init = adapter_factors(peft_model, name)
        with torch.no_grad():
            for layer in lora_layers(peft_model, name).values():
                layer.lora_A[name].weight.copy_(0.3 * torch.randn(2, 16, generator=g))
                layer.lora_B[name].weight.copy_(0.3 * torch.randn(16, 2, generator=g))
        trained = adapter_factors(peft_model, name)
        history.append(StageRecord(stage, f"t{stage}", name, lambda tr=trained, i=init, sc=s: (tr, i, sc)))
        models = merge.consolidate(peft_model, _ctx(stage, history, master))
        train = models.train
    return models, w0, history, master


def _weights(model, master=None):
    return {
        n: (master.value(n, lin.weight) if master else lin.weight).detach().float().clone()
        for n, lin in target_linears(model, TARGETS).items()
    }


PURE = {  # the eval model's delta over W0 after stages 1..t, straight from merges.py
    "task_arithmetic": (lambda: TaskArithmetic(lam=0.5), lambda taus, st, m: merges.task_arithmetic(taus, 0.5)),
    "average": (Average, lambda taus, st, m: merges.average(taus)),
    "ties": (lambda: Ties(density=0.5), lambda taus, st, m: merges.ties(taus, 0.5)),
    "dare": (
        lambda: Dare(p=0.5, seed=3),
        lambda taus, st, m: merges.dare(taus, 0.5, [merges.dare_seed(3, s, m) for s in st]),
    ),
    "magmax": (MagMax, lambda taus, st, m: merges.magmax(taus)),
}


@pytest.fixture(scope="module")
def absorb_weights():
    models, w0, history, master = _stages(Absorb())
    return _weights(models.train)


@pytest.mark.parametrize("train_on", ["sum", "merged"])
@pytest.mark.parametrize("name", list(PURE))
def test_merge_builds_its_train_and_eval_models(name, train_on, absorb_weights, tmp_path):
    build, pure = PURE[name]
    merge = build()
    merge.train_on = train_on
    models, w0, history, master = _stages(merge)
    train, evaluated = _weights(models.train), _weights(models.eval)
    for m in w0:
        taus = history.task_vectors(m)
        expected = w0[m] + pure(taus, [1, 2], m)
        torch.testing.assert_close(evaluated[m], expected, rtol=0, atol=2e-6)
        if train_on == "sum":  # absorb's model, bit for bit: W0 + τ1 + τ2 by the same folds
            assert torch.equal(train[m], absorb_weights[m])
            torch.testing.assert_close(train[m], w0[m] + taus[0] + taus[1], rtol=0, atol=2e-6)
            assert not torch.allclose(evaluated[m], train[m], atol=1e-4)  # the merge differs from the sum
        else:
            assert models.eval is models.train
    if train_on == "sum":
        assert models.eval is not models.train
        assert models.eval.model.embed_tokens.weight is models.train.model.embed_tokens.weight  # shared, not copied
    # resume: a fresh model gets the saved train weights and merge state, and restore rebuilds both models
    files = StageFiles(tmp_path, 2)
    save_model_state(files, models.train, TARGETS, master)
    save_plugin_state(files.state("merge"), merge.state_dict())
    fresh = _llama()
    fresh_master = WeightMaster.attach(fresh, TARGETS)
    load_model_state(files, fresh, TARGETS, fresh_master)
    again = build()
    again.train_on = train_on
    again.load_state_dict(load_plugin_state(files.state("merge")))
    restored = again.restore(fresh, _ctx(2, history, fresh_master))
    assert all(torch.equal(a, b) for a, b in zip(_weights(restored.eval).values(), evaluated.values()))
    assert all(torch.equal(a, b) for a, b in zip(_weights(restored.train).values(), train.values()))


def test_restore_refuses_a_history_that_does_not_reproduce_the_merge():
    merge = MagMax()
    models, w0, history, master = _stages(merge)
    state = merge.state_dict()
    assert state["stages"] == 2 and state["train_on"] == "sum" and state["merged_sq_norm"] > 0
    other = MagMax()
    other.load_state_dict({**state, "merged_sq_norm": state["merged_sq_norm"] * 1.01})
    with pytest.raises(ConfigError, match="stage files changed"):
        other.restore(models.train, _ctx(2, history, master))
    other.load_state_dict({**state, "stages": 1})
    with pytest.raises(ConfigError, match="1 merged stages"):
        other.restore(models.train, _ctx(2, history, master))


def test_bf16_eval_model_comes_from_the_fp32_master():
    models, w0, history, master = _stages(MagMax(), dtype=torch.bfloat16)
    train_exact = _weights(models.train, master)
    for name, linear in target_linears(models.eval, TARGETS).items():
        taus = history.task_vectors(name)
        torch.testing.assert_close(train_exact[name], w0[name] + taus[0] + taus[1], rtol=0, atol=2e-6)
        assert linear.weight.dtype == torch.bfloat16
        exact = train_exact[name] + merges.magmax(taus) - merges.task_sum(taus)  # = W0 + magmax, cast once
        assert torch.equal(linear.weight, exact.to(torch.bfloat16))


def test_a_bad_knob_in_the_config_is_a_one_line_config_error():
    from cl_bench.run.runner import build_plugins
    from helpers import compose

    with pytest.raises(ConfigError, match=r"merge\.density=5 is invalid"):
        build_plugins(compose(["merge=ties", "merge.density=5"]))
    assert build_plugins(compose(["merge=dare", "seed=7"]))["merge"].seed == 7  # ${seed}: the run's seed

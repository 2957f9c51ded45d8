"""GPM and InfLoRA: the energy-threshold memory (GPM Eqs. 16, 20–22), the projections on LoRA
factors (Eqs. 18–19), the shared input collector, InfLoRA's designed A, the re-folded start, and
both regularizers end to end (× vanilla, slice) with a kill -9 mid-stage-2 resume for gpm."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from cl_bench.data.tasks.base import Example, TaskData
from cl_bench.initializers.base import InitResult
from cl_bench.lora import linalg
from cl_bench.lora.layers import (
    WeightMaster,
    adapter_factors,
    apply_init,
    lora_layers,
    lora_scaling,
    replace_start_A_,
    set_scaling,
)
from cl_bench.lora.representations import collect_input_grams
from cl_bench.regularizers.inflora import InfLoRA
from cl_bench.stage import StageContext
from helpers.small import tiny_llama

E = torch.eye(4, dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def _span_equal(M: torch.Tensor, N: torch.Tensor) -> bool:
    """Same column space (compared through the orthogonal projectors)."""
    return M.shape[1] == N.shape[1] and torch.allclose((M @ M.T).double(), (N @ N.T).double(), atol=1e-6)


def _orthogonal(seed: int, d: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


# ------------------------------------------------------------------ the memory (GPM Eqs. 16, 20–22)
@pytest.mark.parametrize("threshold,k", [(0.5, 1), (9 / 14, 1), (0.9, 2), (13 / 14 + 1e-9, 3), (1.0, 3)])
def test_first_task_basis_is_the_smallest_k_reaching_the_energy_threshold(threshold, k):
    """σ(R) = (3, 2, 1, 0): energies 9, 4, 1, 0 of ‖R‖² = 14; cumulative 9/14, 13/14, 1 (Eq. 16).
    A null direction is never added, even at ε = 1."""
    Q = _orthogonal(0, 4)  # the same in a rotated basis
    gram = Q @ torch.diag(torch.tensor([9.0, 4.0, 1.0, 0.0], dtype=torch.float64)) @ Q.T
    M, stats = linalg.basis_update(None, gram, threshold)
    assert M.shape == (4, k) and stats["k"] == k and stats["k_added"] == k
    assert _span_equal(M, Q[:, :k])
    assert stats["energy_kept"] == pytest.approx([9 / 14, 13 / 14, 1.0][k - 1])
    torch.testing.assert_close(M.T @ M, torch.eye(k), atol=1e-6, rtol=0)


@pytest.mark.parametrize("threshold,added", [(0.15, []), (0.2, []), (0.6, [2]), (0.8, [2, 3]), (0.95, [2, 3, 1])])
def test_later_task_adds_residual_directions_until_the_total_energy_reaches_the_threshold(threshold, added):
    """M = [e0]; the new task's energies are (2, 1, 5, 2) on e0..e3, total 10. ‖MᵀR‖² = 2 (0.2);
    the residual (Eq. 20) has σ̂² = 5 (e2), 2 (e3), 1 (e1) (Eq. 21): the totals reach 0.7, 0.9, 1.0."""
    gram = torch.diag(torch.tensor([2.0, 1.0, 5.0, 2.0 - 1e-6], dtype=torch.float64))  # e3 just below e2's tie-break
    M, stats = linalg.basis_update(E[:, :1].float(), gram, threshold)
    assert stats["k_old"] == 1 and stats["k_added"] == len(added) and stats["energy_old"] == pytest.approx(0.2)
    assert torch.equal(M[:, :1], E[:, :1].float())  # Eq. 22: the old basis is kept, new columns appended
    for j, axis in enumerate(added):
        assert abs(float(M[axis, 1 + j])) == pytest.approx(1.0, abs=1e-6)


def test_basis_update_from_the_gram_equals_gpm_on_the_representation_matrix():
    """Eqs. 20–22 done literally on R (SVD of R − M·Mᵀ·R) give the span our Gram form gives."""
    g = torch.Generator().manual_seed(1)
    R1 = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 40, generator=g, dtype=torch.float64)
    R2 = (
        torch.randn(12, 40, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 12, dtype=torch.float64)[:, None]
    )
    M1, _ = linalg.basis_update(None, R1 @ R1.T, 0.99)
    M2, stats = linalg.basis_update(M1, R2 @ R2.T, 0.9)
    M1d = M1.double()
    R_hat = R2 - M1d @ (M1d.T @ R2)  # Eq. 20
    U, S, _ = torch.linalg.svd(R_hat, full_matrices=False)  # Eq. 21
    total, acc = float((R2**2).sum()), float(((M1d.T @ R2) ** 2).sum())
    k = 0
    while acc < 0.9 * total:
        acc += float(S[k] ** 2)
        k += 1
    assert stats["k_added"] == k > 0
    assert _span_equal(M2, torch.cat([M1d, U[:, :k]], 1))
    torch.testing.assert_close(M2.T @ M2, torch.eye(M2.shape[1]), atol=1e-6, rtol=0)


def test_the_authors_covariance_rule_keeps_82_directions_where_gpm_energy_at_097_keeps_213():
    """λ_i(C) = 1/i at d = 256. GPM's energy rule (σ² of R) at ε = 0.97 (InfLoRA's default here
    before): smallest k with H_k ≥ 0.97·H_256 → 213. The InfLoRA/GainLoRA authors' rule: the SVD of
    C with its squared singular values 1/i² ranked, first task sum(cumsum < 0.995) → 82."""
    lam = 1.0 / torch.arange(1, 257, dtype=torch.float64)
    Q = _orthogonal(0, 256)
    C = Q @ torch.diag(lam) @ Q.T
    shares = torch.cumsum(lam**2, 0) / (lam**2).sum()
    assert int((shares < 0.995).sum()) == 82  # the authors' count, by hand from the spectrum
    assert linalg.basis_update(None, C, 0.97, "energy")[1]["k"] == 213
    M, stats = linalg.basis_update(None, C, 0.995, "covariance")
    assert stats["k"] == 82 and stats["criterion"] == "covariance" and _span_equal(M, Q[:, :82])
    with pytest.raises(ValueError, match="criterion"):
        linalg.basis_update(None, C, 0.9, "sigma4")


def test_first_task_basis_size_by_rule_and_later_tasks_alike():
    """C = diag(4, 3, 2, 1). energy (GPM's paper, Eq. 16): shares 0.4, 0.7, 0.9, 1 → the smallest k
    reaching ε = 0.85 is 3 (GPM's code, sum(cumsum < ε), would keep 2). covariance: σ(C)² = 16, 9,
    4, 1 (/30): shares 0.533, 0.833, 0.967, 1 → at ε = 0.9 the authors' first task keeps
    sum(cumsum < 0.9) = 2 (the smallest k reaching it would be 3). A later task adds the smallest
    k under both: M = [e0], C = diag(2, 1, 5, 2): C² = (4, 1, 25, 4)/34, old 0.118, + e2 0.853,
    + e3 0.971 ≥ 0.9 → 2 added (the code's loop gives the same)."""
    C = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    assert linalg.basis_update(None, C, 0.85, "energy")[1]["k"] == 3
    assert linalg.basis_update(None, C, 0.9, "covariance")[1]["k"] == 2
    assert linalg.basis_update(None, C, 0.1, "covariance")[1]["k"] == 1  # at least one direction
    later = torch.diag(torch.tensor([2.0, 1.0, 5.0, 2.0 - 1e-6], dtype=torch.float64))
    M, stats = linalg.basis_update(E[:, :1].float(), later, 0.9, "covariance")
    assert stats["k_added"] == 2 and stats["energy_old"] == pytest.approx(4 / 34, rel=1e-5)
    assert abs(float(M[2, 1])) == pytest.approx(1.0, abs=1e-6) and abs(float(M[3, 2])) == pytest.approx(1.0, abs=1e-6)


def test_inflora_and_gainlora_memories_follow_the_authors_rule_and_gpm_its_paper():
    """Defaults: InfLoRA and GainLoRA's gate memory as the authors run them (ε = 0.995 raised by
    0.005/15 per task, the covariance rule); GPM as its paper (energy)."""
    from cl_bench.mergers.gainlora import GainLoRA
    from cl_bench.regularizers.gpm import GPM
    from cl_bench.run.runner import build_plugins
    from helpers import compose

    for memory in (InfLoRA().memory, GainLoRA().memory):
        assert (memory.threshold, memory.criterion) == (0.995, "covariance")
        assert memory.increment == pytest.approx(0.005 / 15)
    assert (GPM().memory.threshold, GPM().memory.criterion) == (0.97, "energy")
    for overrides in (["regularizer=inflora"], ["regularizer=inflora", "merge=gainlora"], ["merge=gainlora"]):
        plugins = build_plugins(compose(overrides))
        memory = (plugins["regularizer"] if overrides[0] == "regularizer=inflora" else plugins["merge"]).memory
        assert (memory.threshold, memory.criterion) == (0.995, "covariance")
        assert memory.increment == pytest.approx(0.005 / 15, rel=1e-6)
    from cl_bench.infra.errors import ConfigError

    with pytest.raises(ConfigError, match="criterion='sigma4'"):
        InfLoRA(criterion="sigma4")


def test_inflora_designs_a_from_inputs_under_gainlora_and_projects_otherwise():
    """merge=gainlora regularizer=inflora is the authors' GainLoRA+InfLoRA trainer, which designs A
    from the inputs at every task; their InfLoRA baseline (any other merge) projects the init's A."""
    from cl_bench.run.runner import build_plugins
    from helpers import compose

    assert build_plugins(compose(["regularizer=inflora", "merge=gainlora"]))["regularizer"].design == "inputs"
    assert build_plugins(compose(["regularizer=inflora"]))["regularizer"].design == "project"
    assert (
        build_plugins(compose(["regularizer=inflora", "regularizer.design=project", "merge=gainlora"]))[
            "regularizer"
        ].design
        == "project"
    )


def test_threshold_schedule_and_bad_values():
    assert linalg.stage_threshold(0.97, 0.003, 1) == 0.97
    assert linalg.stage_threshold(0.97, 0.003, 3) == pytest.approx(0.976)
    assert linalg.stage_threshold(0.99, 0.01, 5) == 1.0  # capped
    with pytest.raises(ValueError):
        linalg.stage_threshold(1.2, 0.0, 1)
    from cl_bench.infra.errors import ConfigError

    with pytest.raises(ConfigError, match="regularizer \\(inflora\\).*threshold"):
        InfLoRA(threshold=-0.1)
    with pytest.raises(ConfigError, match="design='nope'.*project, inputs"):
        InfLoRA(design="nope")


# ------------------------------------------------------------------ GPM on LoRA factors (Eqs. 18–19)
def _factors(seed, d_in=16, d_out=10, r=3, k=5):
    g = torch.Generator().manual_seed(seed)
    M = torch.linalg.qr(torch.randn(d_in, k, generator=g))[0]
    return (
        torch.randn(r, d_in, generator=g),
        torch.randn(d_out, r, generator=g),
        M,
        torch.randn(r, d_in, generator=g),
        torch.randn(d_out, r, generator=g),
    )


def test_projected_gradients_are_orthogonal_to_the_memory():
    A, B, M, gA, gB = _factors(0)
    Q = linalg.lora_input_basis(A, M)
    assert Q.shape == (3, 3)  # k ≥ r and A random: A·M spans ℝ^r, so B's gradient is removed entirely
    pA, pB = linalg.gpm_lora_gradients(gA, gB, M, Q)
    assert float((pA @ M).abs().max()) < 1e-6 and torch.equal(pB, torch.zeros_like(gB))
    A_perp = linalg.project_rows(A, M)  # GPM's project_init: the start A off the memory
    assert float((A_perp @ M).abs().max()) < 1e-6
    torch.testing.assert_close(A_perp.norm(dim=1), A.norm(dim=1))  # rows keep their norms
    assert linalg.lora_input_basis(A_perp, M).shape == (3, 0)  # then B trains freely
    A2, B2, M2, gA2, gB2 = _factors(1, k=2)  # k < r: B loses only the directions A·M reaches
    Q2 = linalg.lora_input_basis(A2, M2)
    pA2, pB2 = linalg.gpm_lora_gradients(gA2, gB2, M2, Q2)
    assert Q2.shape == (3, 2) and float((pB2 @ (A2 @ M2)).abs().max()) < 1e-5 and float(pB2.norm()) > 0.1
    again = linalg.gpm_lora_gradients(pA2, pB2, M2, Q2)  # a projection: idempotent
    torch.testing.assert_close(again[0], pA2, atol=1e-6, rtol=0)
    torch.testing.assert_close(again[1], pB2, atol=1e-6, rtol=0)


def _lora_layer(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(16, 10))
    peft = get_peft_model(net, LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights=False))
    layer = peft.base_model.model[0]
    return peft, layer.lora_A["default"].weight, layer.lora_B["default"].weight


def _steps(seed, project, optimizer, steps=3, pin=False):
    """A tiny LoRA Linear trained on new data for a few steps; returns (change on stored inputs,
    change on new inputs)."""
    peft, A, B = _lora_layer(seed)
    g = torch.Generator().manual_seed(seed + 1)
    M = torch.linalg.qr(torch.randn(16, 2, generator=g))[0]
    X_old, X_new = torch.randn(6, 2, generator=g) @ M.T, torch.randn(32, 16, generator=g)
    Y = torch.randn(32, 10, generator=g)
    Q, AM0, BQ0 = linalg.lora_input_basis(A, M), A.detach() @ M, None
    BQ0 = B.detach() @ Q
    before_old, before_new = peft(X_old).detach(), peft(X_new).detach()
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)([A, B], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        ((peft(X_new) - Y) ** 2).mean().backward()
        if project:
            gA, gB = linalg.gpm_lora_gradients(A.grad, B.grad, M, Q)
            A.grad.copy_(gA)
            B.grad.copy_(gB)
        opt.step()
        if pin:
            with torch.no_grad():
                pA, pB = linalg.gpm_lora_pin(A, B, M, Q, AM0, BQ0)
                A.copy_(pA)
                B.copy_(pB)
    with torch.no_grad():
        return float((peft(X_old) - before_old).abs().max()), float((peft(X_new) - before_new).abs().max())


def test_projected_step_leaves_outputs_on_stored_inputs_unchanged():
    """k = 2 < r = 3, B ≠ 0: both projections matter. SGD with Eq. 18 on both factors: old outputs
    unchanged (to rounding, over several steps: ∇A·M = 0 also removes the ∇B·∇A term); the
    unprojected step moves them. Adam breaks the projection (elementwise 1/√v); gpm_lora_pin
    restores it exactly. New inputs' outputs move in every case."""
    sgd_free, sgd_free_new = _steps(0, project=False, optimizer="sgd")
    sgd_proj, sgd_proj_new = _steps(0, project=True, optimizer="sgd")
    adam_proj, _ = _steps(0, project=True, optimizer="adam")
    adam_pin, adam_pin_new = _steps(0, project=True, optimizer="adam", pin=True)
    assert sgd_free > 1e-2 and sgd_proj < 1e-6
    assert adam_proj > 1e-3 and adam_pin < 1e-6
    assert min(sgd_free_new, sgd_proj_new, adam_pin_new) > 1e-2
    assert _steps(0, project=False, optimizer="sgd", steps=1)[0] > 1e-3  # one step alone already moves them


# ------------------------------------------------------------------ InfLoRA's A
def test_inflora_designs_put_every_row_of_A_orthogonal_to_the_memory():
    g = torch.Generator().manual_seed(2)
    M = torch.linalg.qr(torch.randn(12, 4, generator=g))[0]
    A0 = torch.randn(3, 12, generator=g)
    A = linalg.project_rows(A0, M)
    assert float((A @ M).abs().max()) < 1e-6
    torch.testing.assert_close(A.norm(dim=1), A0.norm(dim=1))
    H = torch.randn(12, 50, generator=g, dtype=torch.float64)
    P = linalg.principal_rows(H @ H.T, M, 3)
    assert float((P @ M).abs().max()) < 1e-6
    torch.testing.assert_close(P @ P.T, torch.eye(3), atol=1e-6, rtol=0)
    # the CVPR design: the top principal directions of Ĥ = H − M·Mᵀ·H
    U = torch.linalg.svd(H - M.double() @ (M.double().T @ H), full_matrices=False)[0]
    assert _span_equal(P.T, U[:, :3])
    # a memory of d − 1 directions leaves room for one row; the others are 0
    full = torch.linalg.qr(torch.randn(12, 11, generator=g))[0]
    P1 = linalg.principal_rows(H @ H.T, full, 3)
    assert float((P1 @ full).abs().max()) < 1e-6 and float(P1[0].norm()) == pytest.approx(1.0) and not P1[1:].any()


def _llama(seed=0):
    return tiny_llama(seed=seed)


def _batches(n=2, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (bs, 7), generator=g)
        mask = torch.ones(bs, 7, dtype=torch.long)
        mask[0, 5:] = 0  # right padding
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
    return out


def _ctx(model_master, absorbed, **kw):
    ex = [Example(f"e{i}", "p", "a") for i in range(9)]
    task = TaskData("t", "exact_match", ex[1:], ex[:1])
    return StageContext(
        stage=2,
        current=task,
        previous=[],
        rank=2,
        alpha=4.0,
        scaling=lora_scaling(4, 2, "rslora"),
        target_modules=["q_proj", "v_proj"],
        device=torch.device("cpu"),
        seed=0,
        make_batches=lambda t, n, bs, seed: iter(_batches(n, bs, seed)),
        adapter="stage_02",
        master=model_master,
        init_absorbed=absorbed,
        **kw,
    )


@pytest.mark.parametrize("design", ["project", "inputs"])
def test_inflora_sets_A_off_the_memory_freezes_it_and_keeps_the_absorbed_function(design):
    """An absorbed init with B0 ≠ 0 (as SLICE leaves it): InfLoRA replaces A and re-folds
    s·B0·(A0 − A), so the model computes what it computed before the stage; only B trains."""
    model = _llama()
    batch = _batches(1)[0]
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    master = WeightMaster.attach(model, ["q_proj", "v_proj"])
    peft = get_peft_model(
        model,
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True),
        adapter_name="stage_02",
    )
    set_scaling(peft, "stage_02", "rslora")
    g = torch.Generator().manual_seed(3)
    init = {
        n: (torch.randn(2, 16, generator=g), 0.3 * torch.randn(16, 2, generator=g))
        for n in lora_layers(peft, "stage_02")
    }
    apply_init(peft, InitResult(factors=init, absorb=True), "stage_02", master)
    reg = InfLoRA(design=design, n_samples=8, batch_size=4)
    memory = {n: torch.linalg.qr(torch.randn(16, 5, generator=g))[0] for n in init}
    reg.memory.bases = dict(memory)
    reg.begin_stage(peft, _ctx(master, absorbed=True))
    with torch.no_grad():
        after = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    for n, (A, B) in adapter_factors(peft, "stage_02").items():
        assert float((A @ memory[n]).abs().max()) < 1e-6
        assert torch.equal(B, init[n][1])  # B starts where the initializer put it
        if design == "inputs":  # the authors' `lora_A /= sqrt(3)` on unit singular vectors
            torch.testing.assert_close(A.norm(dim=1), torch.full((2,), 3**-0.5), atol=1e-6, rtol=0)
            torch.testing.assert_close(3 * A @ A.T, torch.eye(2), atol=1e-5, rtol=0)
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n in trainable) and len(trainable) == 2


def test_collector_sums_real_token_inputs_and_pooled_rows():
    """Token inputs: padding rows (attention_mask 0) never enter; [batch, d] inputs count per row."""

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.lin, self.gate = torch.nn.Embedding(64, 6), torch.nn.Linear(6, 3), torch.nn.Linear(6, 1)

        def forward(self, input_ids, attention_mask, labels=None):
            h = self.emb(input_ids)
            return self.lin(h), self.gate(h.mean(1))

    toy = Toy()
    batches = _batches(2)
    got = collect_input_grams(toy, {"lin": toy.lin, "gate": toy.gate}, batches)
    with torch.no_grad():
        h = [toy.emb(b["input_ids"]).double() for b in batches]
        real = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(h, batches)])
        pooled = torch.cat([x.mean(1) for x in h])
    torch.testing.assert_close(got.grams["lin"], real.T @ real)
    torch.testing.assert_close(got.grams["gate"], pooled.T @ pooled)
    assert got.rows == {"lin": 2 * 28 - 4, "gate": 8} and got.batches == 2
    assert toy.training  # the training flag is restored


def test_replace_start_A_without_absorption_folds_nothing():
    model = _llama()
    master = WeightMaster.attach(model, ["q_proj"])
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), adapter_name="stage_01")
    name = next(iter(lora_layers(peft, "stage_01")))
    weight = lora_layers(peft, "stage_01")[name].get_base_layer().weight.clone()
    summary = replace_start_A_(peft, "stage_01", {name: torch.ones(2, 16)}, master, absorbed=False)
    assert summary["refolded_fro"] == 0.0 and torch.equal(
        lora_layers(peft, "stage_01")[name].get_base_layer().weight, weight
    )
    assert torch.equal(lora_layers(peft, "stage_01")[name].lora_A["stage_01"].weight, torch.ones(2, 16))
    with pytest.raises(ValueError, match="does not match"):
        replace_start_A_(peft, "stage_01", {name: torch.ones(3, 16)}, master, absorbed=False)


# ------------------------------------------------------------------ end to end (tiny model)
E2E = [
    "threads=1",
    "sequence=synthetic_conflict",
    "sequence.tasks=[sentiment,parity]",
    "trainer.max_steps=4",
    "sequence.n_eval=4",
    "trainer.checkpoint_every_steps=2",
]
COMBOS = [("gpm", "vanilla"), ("gpm", "slice"), ("inflora", "vanilla"), ("inflora", "slice")]


def _overrides(reg, init):
    from helpers import FAST

    return (
        FAST
        + E2E
        + [f"regularizer={reg}", f"initializer={init}"]
        + (["initializer.capture_steps=2"] if init == "slice" else [])
    )


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    from cl_bench.run.runner import run
    from helpers import compose

    out = {}
    for reg, init in COMBOS:
        run_dir = tmp_path_factory.mktemp(f"{reg}_{init}")
        out[reg, init] = run_dir, run(compose(_overrides(reg, init)), run_dir)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("reg,init", COMBOS)
def test_stage_2_leaves_the_stored_inputs_of_stage_1_unchanged(runs, reg, init):
    """τ_2·M_1 = 0: stage 2's net change of every target weight vanishes on the memory built after
    stage 1, exactly (gpm: projected gradients and steps; inflora: frozen A ⟂ M_1). With slice the
    absorbed init was re-folded and the history records the start training really had."""
    from cl_bench.run.store import StageFiles, load_plugin_state, load_stage_record

    run_dir, results = runs[reg, init]
    assert results["complete"] and all(v is not None for row in results["matrix"] for v in row)
    state = load_plugin_state(run_dir / "stages" / "stage_02" / "regularizer.safetensors")
    k1 = state["memory_stages"][0]["k"]
    record = load_stage_record(StageFiles(run_dir, 2))
    assert len(record.modules) == 28 and (record.init is not None) == (init == "slice")
    for m in record.modules:
        M2 = state[f"basis.{m}"]
        torch.testing.assert_close(M2.T @ M2, torch.eye(M2.shape[1]), atol=2e-5, rtol=0)
        M1 = M2[:, : k1[m]]
        assert 1 <= k1[m] <= M2.shape[1] < M2.shape[0]
        tau = record.task_vector(m)
        assert float(tau.norm()) > 0 and float((tau @ M1).norm()) < 2e-5 * float(tau.norm()), m
        A = record.trained[m][0]
        if reg == "inflora":
            assert float((A @ M1).abs().max()) < 1e-5
            if init == "slice":
                assert torch.equal(A, record.init[m][0])  # frozen from the re-folded start


@pytest.mark.slow
def test_gpm_resumes_after_sigkill_mid_stage_2_to_the_identical_matrix_and_memory(runs, tmp_path):
    from cl_bench.infra.files import load_tensors
    from cl_bench.run.runner import run
    from helpers import compose, run_cli

    killed = run_cli(
        _overrides("gpm", "vanilla") + [f"hydra.run.dir={tmp_path}"], env_extra={"CL_BENCH_KILL_AT": "train:2:2"}
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "stages" / "stage_02" / "checkpoint" / "regularizer.safetensors").exists()
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is False
    final = run(compose(_overrides("gpm", "vanilla")), tmp_path)  # resumed in-process: one process start less
    ref_dir, reference = runs["gpm", "vanilla"]
    assert final["matrix"] == reference["matrix"]
    assert [s["train"]["loss_curve"] for s in final["stages"]] == [
        s["train"]["loss_curve"] for s in reference["stages"]
    ]
    ours = load_tensors(tmp_path / "stages" / "stage_02" / "regularizer.safetensors")
    ref = load_tensors(ref_dir / "stages" / "stage_02" / "regularizer.safetensors")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)

"""The pure math of the initializers against the papers' formulas, on random matrices."""

from __future__ import annotations

import math

import pytest
import torch

from cl_bench.lora import linalg

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _conflicting_pair(seed=0, shape=(12, 20)):
    """g, h with ⟨g, h⟩ < 0."""
    g, h = _rand(*shape, seed=seed), _rand(*shape, seed=seed + 1)
    return g - 0.8 * h, h


def _dot(a, b):
    return float((a.double() * b.double()).sum())


# --------------------------------------------------------------------------- ψ_PCGrad (Eq. 6)
def test_pcgrad_c1_removes_the_conflicting_component():
    g, h = _conflicting_pair()
    assert _dot(g, h) < 0
    out, stats = linalg.project_gradients({"m": g}, {"m": h}, operator="pcgrad", c=1.0, scope="per_module")
    assert stats["fired"] and stats["changed"]
    assert abs(_dot(out["m"], h)) < 1e-4 * g.norm() * h.norm()
    # Eq. 6 literally: g − c·min(⟨g,h⟩, 0)/‖h‖²·h
    expected = g - min(_dot(g, h), 0.0) / _dot(h, h) * h
    torch.testing.assert_close(out["m"], expected, rtol=1e-5, atol=1e-6)


def test_pcgrad_leaves_aligned_gradients_unchanged():
    g, h = _rand(12, 20, seed=3), _rand(12, 20, seed=4)
    g = g + 0.8 * h
    assert _dot(g, h) > 0
    out, stats = linalg.project_gradients({"m": g}, {"m": h}, operator="pcgrad", c=1.0, scope="per_module")
    assert not stats["fired"]
    assert torch.equal(out["m"], g)


@pytest.mark.parametrize(
    "operator,scope,extra",
    [
        ("pcgrad", "global", {}),
        ("pcgrad", "per_module", {}),
        ("magnitude_preserving", "global", {}),
        ("magnitude_preserving", "per_module", {}),
        ("gradvac", "per_module", {"threshold": 0.3}),
        ("nullspace", "per_module", {"nullspace_rank": 3}),
    ],
)
def test_c_zero_is_the_identity_for_every_operator(operator, scope, extra):
    g = {f"m{i}": _conflicting_pair(seed=10 * i)[0] for i in range(3)}
    h = {f"m{i}": _conflicting_pair(seed=10 * i)[1] for i in range(3)}
    out, stats = linalg.project_gradients(g, h, operator=operator, c=0.0, scope=scope, **extra)
    assert not stats["changed"]
    for n in g:
        assert torch.equal(out[n], g[n])


def test_c_half_is_halfway_between_identity_and_pcgrad():
    g, h = _conflicting_pair(seed=7)
    full, _ = linalg.project_gradients({"m": g}, {"m": h}, c=1.0, scope="per_module")
    half, _ = linalg.project_gradients({"m": g}, {"m": h}, c=0.5, scope="per_module")
    torch.testing.assert_close(half["m"], 0.5 * (g + full["m"]), rtol=1e-5, atol=1e-6)


def test_global_scope_equals_pcgrad_on_the_concatenated_vector():
    shapes = [(8, 16), (16, 8), (4, 4)]
    g = {f"m{i}": _rand(*s, seed=i) for i, s in enumerate(shapes)}
    h = {f"m{i}": -0.5 * g[f"m{i}"] + _rand(*s, seed=100 + i) for i, s in enumerate(shapes)}
    for c in (1.0, 0.5):
        out, stats = linalg.project_gradients(g, h, operator="pcgrad", c=c, scope="global")
        G = torch.cat([g[n].reshape(-1) for n in g]).double()
        H = torch.cat([h[n].reshape(-1) for n in h]).double()
        assert stats["fired"] and float(G @ H) < 0
        expected = G - c * min(float(G @ H), 0.0) / float(H @ H) * H
        got = torch.cat([out[n].reshape(-1) for n in g]).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert stats["cos_global"] == pytest.approx(float(G @ H) / float(G.norm() * H.norm()), rel=1e-9)
        assert stats["gamma"] == pytest.approx(-float(G @ H) / float(H @ H), rel=1e-9)


def test_global_gate_follows_the_global_cosine_not_the_modules():
    # module a conflicts, module b agrees strongly: the global cosine is positive -> no projection
    ga, ha = _conflicting_pair(seed=1, shape=(6, 6))
    hb = _rand(30, 30, seed=5)
    gb = 3.0 * hb
    g, h = {"a": ga, "b": gb}, {"a": ha, "b": hb}
    out, stats = linalg.project_gradients(g, h, c=1.0, scope="global")
    assert stats["cos_global"] > 0 and not stats["fired"]
    assert stats["per_module"]["negative_cos"] == 1
    assert torch.equal(out["a"], ga)
    out_pm, stats_pm = linalg.project_gradients(g, h, c=1.0, scope="per_module")
    assert stats_pm["per_module"]["fired"] == 1
    assert abs(_dot(out_pm["a"], ha)) < 1e-4 * ga.norm() * ha.norm()


def test_threshold_gate_projects_mildly_aligned_gradients():
    g, h = _rand(10, 10, seed=1), _rand(10, 10, seed=2)
    g = g + 0.2 * h * g.norm() / h.norm()
    cos = _dot(g, h) / float(g.norm() * h.norm())
    assert 0 < cos < 0.5
    out, stats = linalg.project_gradients({"m": g}, {"m": h}, c=1.0, scope="per_module", threshold=0.5)
    assert stats["fired"]
    assert abs(_dot(out["m"], h)) < 1e-4 * g.norm() * h.norm()


def test_magnitude_preserving_keeps_norm_and_pcgrad_direction():
    g, h = _conflicting_pair(seed=9)
    pc, _ = linalg.project_gradients({"m": g}, {"m": h}, operator="pcgrad", c=1.0, scope="per_module")
    mp, _ = linalg.project_gradients({"m": g}, {"m": h}, operator="magnitude_preserving", c=1.0, scope="per_module")
    assert float(mp["m"].norm()) == pytest.approx(float(g.norm()), rel=1e-5)
    cos = _dot(mp["m"], pc["m"]) / float(mp["m"].norm() * pc["m"].norm())
    assert cos == pytest.approx(1.0, abs=1e-6)


def test_gradvac_reaches_the_target_cosine_and_is_pcgrad_at_zero_target():
    g, h = _conflicting_pair(seed=11)
    out, stats = linalg.project_gradients(
        {"m": g}, {"m": h}, operator="gradvac", c=1.0, scope="per_module", threshold=0.3
    )
    assert stats["fired"]
    new_cos = _dot(out["m"], h) / float(out["m"].norm() * h.norm())
    assert new_cos == pytest.approx(0.3, abs=1e-5)
    gv0, _ = linalg.project_gradients({"m": g}, {"m": h}, operator="gradvac", c=1.0, scope="per_module", threshold=0.0)
    pc, _ = linalg.project_gradients({"m": g}, {"m": h}, operator="pcgrad", c=1.0, scope="per_module")
    torch.testing.assert_close(gv0["m"], pc["m"], rtol=1e-5, atol=1e-6)


def test_nullspace_removes_the_top_subspace_of_the_previous_gradient():
    g = _rand(16, 24, seed=1)
    # h with a clear rank-3 dominant subspace
    h = _rand(16, 3, seed=2) @ _rand(3, 24, seed=3) * 10 + 0.01 * _rand(16, 24, seed=4)
    out, stats = linalg.project_gradients(
        {"m": g}, {"m": h}, operator="nullspace", c=1.0, scope="per_module", nullspace_rank=3
    )
    U = torch.linalg.svd(h)[0][:, :3]
    assert float((U.T @ out["m"]).abs().max()) < 1e-4
    assert stats["changed"]
    half, _ = linalg.project_gradients(
        {"m": g}, {"m": h}, operator="nullspace", c=0.5, scope="per_module", nullspace_rank=3
    )
    torch.testing.assert_close(half["m"], 0.5 * (g + out["m"]), rtol=1e-4, atol=1e-5)


def test_nullspace_removes_the_right_subspace_of_a_flat_spectrum():
    """Singular values 1, 1, 1, 1 then a flat tail 0.9 → 0.45 (64×64): a sketch of only q = k
    columns returns a subspace far from the top 4 (projector distance ≈ 0.6); with the selection's
    oversampling (q = 4k) it is close (≈ 0.2)."""
    n, k = 64, 4
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    s = torch.cat([torch.ones(k, dtype=torch.float64), torch.linspace(0.9, 0.45, n - k, dtype=torch.float64)])
    h = ((U * s) @ V.T).float()
    plan = linalg.ModulePlan(fired=True, nullspace_rank=k, c=1.0, seed=3)
    removed = torch.eye(n) - linalg.apply_plan(torch.eye(n), h, plan)  # = U_k U_kᵀ of the sketch
    exact = (U[:, :k] @ U[:, :k].T).float()
    distance = float((removed - exact).norm()) / (2 * k) ** 0.5  # 0 = same subspace, 1 = orthogonal
    assert distance < 0.3
    assert linalg.oversampled_columns(k, h.shape) == 16 and linalg.oversampled_columns(8, (16, 24)) == 16


def test_stable_scale_is_lora_gas_formula():
    # ζ = d_out^(1/4)/√γ: 16^(1/4)/√16 = 2/4, 81^(1/4)/√9 = 1.
    assert linalg.stable_scale(16, 16) == pytest.approx(0.5)
    assert linalg.stable_scale(81, 9) == pytest.approx(1.0)
    A, B = _rand(2, 5, seed=1), _rand(16, 2, seed=2)
    A2, B2, zeta = linalg.stable_scale_factors(A, B, 16)
    assert zeta == pytest.approx(0.5)
    torch.testing.assert_close(A2, 0.5 * A) and torch.testing.assert_close(B2, 0.5 * B)
    with pytest.raises(ValueError):
        linalg.stable_scale(16, 0)


def test_zero_previous_gradient_never_fires():
    g = _rand(5, 5)
    out, stats = linalg.project_gradients({"m": g}, {"m": torch.zeros(5, 5)}, c=1.0, scope="global")
    assert not stats["fired"] and stats["cos_global"] == 0.0
    assert torch.equal(out["m"], g)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"c": 1.5}, "outside"),
        ({"c": -0.1}, "outside"),
        ({"operator": "cagrad"}, "operator"),
        ({"operator": "gradvac", "scope": "global"}, "no global form"),
        ({"operator": "nullspace", "scope": "global", "nullspace_rank": 2}, "no global form"),
        ({"operator": "nullspace", "scope": "per_module"}, "nullspace_rank"),
        ({"operator": "pcgrad", "scope": "per_module", "nullspace_rank": 4}, "only applies"),
        ({"scope": "layer"}, "scope"),
        ({"operator": "gradvac", "scope": "per_module", "threshold": 1.0}, "target cosine"),
    ],
)
def test_invalid_projection_arguments_are_rejected(kwargs, match):
    args = {"operator": "pcgrad", "c": 1.0, "scope": "global", "threshold": 0.0, "nullspace_rank": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        linalg.check_projection_args(**args)


# --------------------------------------------------------------------------- SVD selection (Eq. 7)
def _spectrum_matrix(d_out, d_in, sigmas, seed=0):
    U, _ = torch.linalg.qr(_rand(d_out, len(sigmas), seed=seed))
    V, _ = torch.linalg.qr(_rand(d_in, len(sigmas), seed=seed + 1))
    return U @ torch.diag(torch.tensor(sigmas)) @ V.T, U, V


def _projector(M):
    return M @ torch.linalg.pinv(M)


def test_lora_ga_selection_shapes_and_subspaces():
    r = 4
    sigmas = [float(2 ** (12 - i)) for i in range(12)]  # well separated spectrum, rank 12
    G, U, V = _spectrum_matrix(40, 30, sigmas)
    for method in ("exact", "randomized"):
        A, B, S = linalg.lora_ga_selection(G, r, method=method, seed=1)
        assert A.shape == (r, 30) and B.shape == (40, r)
        assert S.shape[0] == min(4 * r, 30)
        # B spans the top-r left singular subspace; A's rows span right singular vectors r+1..2r
        torch.testing.assert_close(_projector(B), U[:, :r] @ U[:, :r].T, atol=1e-4, rtol=0)
        torch.testing.assert_close(_projector(A.T), V[:, r : 2 * r] @ V[:, r : 2 * r].T, atol=1e-4, rtol=0)
        # orthonormal columns / rows
        torch.testing.assert_close(B.T @ B, torch.eye(r), atol=1e-5, rtol=0)
        torch.testing.assert_close(A @ A.T, torch.eye(r), atol=1e-5, rtol=0)


def test_lora_ga_selection_needs_2r_columns():
    with pytest.raises(ValueError, match="2r"):
        linalg.lora_ga_selection(_rand(10, 7), 4)


def test_randomized_svd_is_seeded_and_leaves_the_global_rng_alone():
    M = _rand(50, 40, seed=3)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    U1, S1, V1 = linalg.randomized_svd(M, q=8, niter=2, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    U2, S2, V2 = linalg.randomized_svd(M, q=8, niter=2, seed=5)
    assert torch.equal(U1, U2) and torch.equal(S1, S2) and torch.equal(V1, V2)
    U3, _, _ = linalg.randomized_svd(M, q=8, niter=2, seed=6)
    assert not torch.equal(U1, U3)


def test_singular_value_mass():
    S = torch.tensor([3.0, 2.0, 1.0])
    assert linalg.singular_value_mass(S, 14.0, 2) == pytest.approx(13.0 / 14.0)
    assert linalg.singular_value_mass(S, 0.0, 2) == 0.0


# --------------------------------------------------------------------------- β rescale (Eq. 8–9)
def test_product_variance_matches_the_materialised_product():
    B, A = _rand(30, 5, seed=1) + 0.3, _rand(5, 20, seed=2) - 0.1
    assert linalg.product_variance(B, A) == pytest.approx(float((B.double() @ A.double()).var()), rel=1e-9)


@pytest.mark.parametrize("r", [2, 4, 8])
def test_rescale_matches_rank_corrected_weight_variance(r):
    d_out, d_in = 48, 32
    W = 0.02 * _rand(d_out, d_in, seed=r)
    G = _rand(d_out, d_in, seed=100 + r)
    A, B, _ = linalg.lora_ga_selection(G, r, method="exact")
    A2, B2, beta = linalg.rescale_factors(W, A, B)
    eta_r = math.log(r) / math.log(min(d_out, d_in))
    assert float((B2 @ A2).double().var()) == pytest.approx(eta_r * float(W.double().var()), rel=1e-4)
    expected_beta = (eta_r * float(W.double().var()) / float((B @ A).double().var())) ** 0.25
    assert beta == pytest.approx(expected_beta, rel=1e-6)


# --------------------------------------------------------------------------- DST-I (LoRAM)
def test_dst1_factors_follow_the_formula_and_are_orthonormal():
    d_out, d_in, r = 12, 9, 3
    A, B = linalg.dst1_factors(d_out, d_in, r)
    assert A.shape == (r, d_in) and B.shape == (d_out, r)
    k, i = 1, 4
    assert float(A[k, i]) == pytest.approx(
        math.sqrt(2 / (d_in + 1)) * math.sin(math.pi * (k + 1) * (i + 1) / (d_in + 1)), rel=1e-6
    )
    assert float(B[i, k]) == pytest.approx(
        math.sqrt(2 / (d_out + 1)) * math.sin(math.pi * (i + 1) * (k + 1) / (d_out + 1)), rel=1e-6
    )
    torch.testing.assert_close(A @ A.T, torch.eye(r), atol=1e-5, rtol=0)
    torch.testing.assert_close(B.T @ B, torch.eye(r), atol=1e-5, rtol=0)
    # the full DST-I matrix is orthonormal (rows = the first n of n)
    full = linalg.dst1_rows(7, 7)
    torch.testing.assert_close(full @ full.T, torch.eye(7), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- MiLoRA
def test_minor_component_factors_absorb_exactly_the_minor_part():
    W = _rand(20, 16, seed=4)
    r, s = 3, 2.0
    A, B = linalg.minor_component_factors(W, r, s)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    minor = U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:]
    torch.testing.assert_close(s * B @ A, minor, atol=1e-5, rtol=1e-5)
    residual_sv = torch.linalg.svdvals(W - s * B @ A)
    torch.testing.assert_close(residual_sv[: 16 - r], S[: 16 - r], atol=1e-4, rtol=1e-4)
    assert float(residual_sv[16 - r :].abs().max()) < 1e-4


def test_singular_pairs_get_one_sign_whatever_the_svd_returned():
    """An SVD fixes (u_i, v_i) only up to a joint sign; LoRA-GA's B·A pairs u_i with v_{r+i}, so the
    init would depend on that choice. canonical_signs makes the largest-|.| entry of each u_i positive."""
    from cl_bench.lora.linalg import canonical_signs, lora_ga_selection

    U = torch.tensor([[0.6, -0.8], [-0.8, -0.6]])
    V = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    Uc, Vc = canonical_signs(U, V)
    assert torch.equal(
        Uc, torch.tensor([[-0.6, 0.8], [0.8, 0.6]])
    )  # column 0's largest entry was -0.8, column 1's -0.8
    assert torch.equal(Vc, torch.tensor([[-1.0, 0.0], [0.0, -1.0]]))
    flipped = torch.tensor([1.0, -1.0])
    assert all(torch.equal(a, b) for a, b in zip(canonical_signs(U * flipped, V * flipped), (Uc, Vc)))
    # the LoRA-GA product is a function of G: the exact and the randomized SVD agree on it
    G = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)) @ torch.randn(
        8, 30, generator=torch.Generator().manual_seed(1)
    )
    products = []
    for method in ("exact", "randomized"):
        A, B, _ = lora_ga_selection(G, 2, method=method, seed=3)
        products.append(B @ A)
    torch.testing.assert_close(products[1], products[0], rtol=1e-3, atol=1e-4)

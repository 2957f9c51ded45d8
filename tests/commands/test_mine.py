"""Sequence mining: exhaustive search vs brute force, sketch, ordering rule, CLI end to end."""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cl_bench import mine
from cl_bench.data.tasks import superni

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def random_cosines(m: int, seed: int, rank: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, rank))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    return a @ a.T


@pytest.mark.parametrize("n, size", [(1, 1), (5, 1), (6, 3), (10, 5), (7, 7), (12, 2)])
def test_combinations_array_is_lexicographic_and_complete(n, size):
    got = mine.combinations_array(n, size)
    assert [tuple(r) for r in got] == list(combinations(range(n), size))


@pytest.mark.parametrize(
    "m, size, top_k, seed", [(9, 3, 5, 0), (11, 5, 10, 1), (8, 2, 4, 2), (7, 7, 3, 3), (13, 4, 1, 4)]
)
def test_search_matches_brute_force(m, size, top_k, seed):
    cos = random_cosines(m, seed)
    fast = mine.lowest_mean_cosine_subsets(cos, size, top_k)
    slow = mine.brute_force_subsets(cos, size, top_k)
    assert [s for _, s in fast] == [s for _, s in slow]
    assert np.allclose([v for v, _ in fast], [v for v, _ in slow], atol=1e-12)


def test_search_breaks_ties_by_indices():
    cos = np.full((6, 6), 0.5)
    np.fill_diagonal(cos, 1.0)
    best = mine.lowest_mean_cosine_subsets(cos, 3, 4)
    assert [s for _, s in best] == [(0, 1, 2), (0, 1, 3), (0, 1, 4), (0, 1, 5)]
    assert all(v == pytest.approx(0.5) for v, _ in best)


def test_search_finds_a_planted_conflicting_group():
    cos = np.full((20, 20), 0.3)
    planted = (2, 7, 11, 15, 19)
    for a, b in combinations(planted, 2):
        cos[a, b] = cos[b, a] = -0.4
    np.fill_diagonal(cos, 1.0)
    (score, subset), *_ = mine.lowest_mean_cosine_subsets(cos, 5, 3)
    assert subset == planted and score == pytest.approx(-0.4)


def test_search_validates_arguments():
    cos = random_cosines(4, 0)
    with pytest.raises(mine.ConfigError, match="--size"):
        mine.lowest_mean_cosine_subsets(cos, 5, 1)
    with pytest.raises(mine.ConfigError, match="--top-k"):
        mine.lowest_mean_cosine_subsets(cos, 2, 0)


def test_bench_runs_on_the_paper_pool_size():
    result = mine.bench_search(pool_size=46, size=5, top_k=10)
    assert result["subsets"] == math.comb(46, 5) == 1_370_754
    assert -1.0 <= result["best_mean_cosine"] <= 1.0


def test_greedy_order_starts_with_the_most_conflicting_task():
    cos = np.array(
        [
            [1.0, 0.2, 0.1, 0.3],
            [0.2, 1.0, -0.5, 0.0],
            [0.1, -0.5, 1.0, 0.4],
            [0.3, 0.0, 0.4, 1.0],
        ]
    )
    # mean to the rest: 0 -> 0.2, 1 -> -0.1, 2 -> 0.0, 3 -> 0.233: start with 1;
    # then lowest cosine to {1}: 2 (-0.5); then mean to {1,2}: 0 -> 0.15, 3 -> 0.2: 0, then 3.
    assert mine.order_subset((0, 1, 2, 3), cos, "greedy") == [1, 2, 0, 3]
    assert mine.order_subset((3, 0, 2), cos, "given") == [0, 2, 3]
    with pytest.raises(mine.ConfigError, match="--order"):
        mine.order_subset((0, 1), cos, "alphabetical")


def test_count_sketch_estimates_inner_products_and_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(300, 200, generator=gen)
    grads_a = {
        "l.0.q": shared + 0.5 * torch.randn(300, 200, generator=gen),
        "l.0.v": torch.randn(50, 40, generator=gen),
    }
    grads_b = {
        "l.0.q": -shared + 0.5 * torch.randn(300, 200, generator=gen),
        "l.0.v": torch.randn(50, 40, generator=gen),
    }
    exact = mine.cosine_matrix([mine.count_sketch(grads_a, 0, 42), mine.count_sketch(grads_b, 0, 42)])
    flat_a = torch.cat([grads_a[k].flatten() for k in sorted(grads_a)]).double()
    flat_b = torch.cat([grads_b[k].flatten() for k in sorted(grads_b)]).double()
    true_cos = float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm()))
    assert exact[0, 1] == pytest.approx(true_cos, abs=1e-9)
    sketched = mine.cosine_matrix([mine.count_sketch(grads_a, 1 << 14, 42), mine.count_sketch(grads_b, 1 << 14, 42)])
    # CountSketch error on a cosine is about 1/sqrt(dim) = 0.008.
    assert sketched[0, 1] == pytest.approx(exact[0, 1], abs=0.04)
    assert np.allclose(np.diag(sketched), 1.0) and sketched[0, 1] == sketched[1, 0]
    again = mine.count_sketch(grads_a, 1 << 14, 42)
    assert torch.equal(again.vector, mine.count_sketch(grads_a, 1 << 14, 42).vector)
    # Linear in the gradient (the hash depends only on seed and module name).
    doubled = mine.count_sketch({k: 2 * v for k, v in grads_a.items()}, 1 << 14, 42)
    assert torch.allclose(doubled.vector, 2 * again.vector)


def test_csv_round_trip_and_yaml(tmp_path):
    names = ["task088_identify_typo_verification", "task363_sst2_polarity_classification"]
    cos = np.array([[1.0, -0.25], [-0.25, 1.0]])
    mine.write_cosine_csv(tmp_path / "c.csv", names, cos)
    got_names, got = mine.read_cosine_csv(tmp_path / "c.csv")
    assert got_names == names and np.allclose(got, cos)
    text = mine.sequence_yaml("ni_mined_1", "superni", names, None, 200, ["rank 1"])
    seq = OmegaConf.create(text)
    assert seq.name == "ni_mined_1" and list(seq.tasks) == names and seq.n_train is None and seq.n_eval == 200


def test_named_pools_resolve_to_distinct_table_tasks():
    for name, size in (("diverse46", 46), ("slice61", 61)):
        resolved = [superni.resolve_task_name(t) for t in mine.parse_pool(name, None)]
        assert len(resolved) == len(set(resolved)) == size
        assert all(t in superni.METRIC_TABLE for t in resolved)
    slice61 = {superni.resolve_task_name(t) for t in mine.NAMED_POOLS["slice61"]}
    conf = Path(__file__).resolve().parents[2] / "conf" / "sequence"
    for i in range(1, 6):  # the paper's Opp sequences come from this pool
        assert set(OmegaConf.load(conf / f"ni_opp{i}.yaml").tasks) <= slice61


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    assert mine.main(["--out", str(tmp_path)]) == 2
    assert "--pool" in capsys.readouterr().err
    assert (
        mine.main(
            ["--pool", "088,090", "--size", "5", "--data-root", str(tmp_path), "--out", str(tmp_path), "--skip-missing"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "only 0 pool task(s) have data" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def tiny_model(request):
    try:
        return request.getfixturevalue("tiny_model_dir")
    except pytest.FixtureLookupError:
        from cl_bench.data.tiny_model import ensure_tiny_model

        return ensure_tiny_model()


@pytest.mark.slow
def test_end_to_end_mining_on_sample_tasks(tmp_path, tiny_model, monkeypatch):
    if not (SHARED_DATA / "superni").is_dir():
        pytest.skip(f"real SuperNI samples not found at {SHARED_DATA}/superni (an optional data folder)")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    pool = ["088", "090", "363", "243", "141", "task611_mutual_multi_turn_dialogue"]
    out = tmp_path / "mined"
    code = mine.main(
        [
            "--pool",
            ",".join(pool),
            "--data-root",
            str(SHARED_DATA),
            "--size",
            "3",
            "--top-k",
            "4",
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--max-len",
            "128",
            "--sketch-dim",
            "4096",
            "--cache-dir",
            str(Path(tiny_model).parent),
            "--skip-missing",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    summary = json.loads((out / "mining.json").read_text())
    assert list(summary["missing"]) == ["task611_mutual_multi_turn_dialogue"]
    names, cos = mine.read_cosine_csv(out / "cosine.csv")
    assert names == [superni.resolve_task_name(p) for p in pool[:5]]
    assert np.allclose(cos, cos.T) and np.allclose(np.diag(cos), 1.0) and np.all(np.abs(cos) <= 1.0)
    assert (out / "cosine.png").stat().st_size > 1000
    best = mine.brute_force_subsets(cos, 3, 4)
    assert len(summary["sequences"]) == 4
    for entry, (score, subset) in zip(summary["sequences"], best):
        seq = OmegaConf.load(out / "sequences" / f"{entry['name']}.yaml")
        assert seq.family == "superni" and sorted(seq.tasks) == sorted(names[i] for i in subset)
        assert entry["mean_cosine"] == pytest.approx(score, abs=1e-5)  # the CSV keeps 6 decimals
        assert list(seq.tasks) == [names[i] for i in mine.order_subset(subset, cos, "greedy")]

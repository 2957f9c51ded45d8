"""Row 0 from the prediction cache (cache.row0): the same run as without it, bitwise (matrix, every
predictions file, loss curves), with row 0's generation skipped on a hit; a change of what decides
the predictions (here the prompt's system message) misses."""

from __future__ import annotations

import pytest

import cl_bench.evaluation.seen as seen
from cl_bench.run.runner import run
from helpers import FAST, compose

pytestmark = pytest.mark.slow


def _predictions(run_dir):
    return {str(p.relative_to(run_dir)): p.read_text() for p in sorted((run_dir / "predictions").rglob("*.jsonl"))}


def test_row0_from_the_cache_is_the_same_run(tiny_model_dir, tmp_path, monkeypatch):
    generated = []  # the tasks whose predictions were generated, in order
    real = seen._run_batches
    monkeypatch.setattr(seen, "_run_batches", lambda *a, **k: generated.append(a[8]) or real(*a, **k))
    base = FAST + ["sequence=synthetic_conflict", "sequence.tasks=[sentiment,parity]", f"cache.dir={tmp_path / 'c'}"]
    # the built tiny model by path: a fresh cache.dir would otherwise build it again (minutes)
    base += ["model.builder=null", f"model.name_or_path={tiny_model_dir}"]
    runs = {}
    for name, extra in (("off", ["cache.row0=false"]), ("miss", []), ("hit", []), ("system", [])):
        if name == "system":
            extra = ["evaluation.prompt.system=Answer briefly."]
        generated.clear()
        results = run(compose(base + extra), tmp_path / name)
        runs[name] = (results, _predictions(tmp_path / name), list(generated))
    off, miss, hit, system = runs["off"], runs["miss"], runs["hit"], runs["system"]
    for other in (miss, hit):
        assert other[0]["matrix"] == off[0]["matrix"]
        assert other[1] == off[1]  # every predictions file, row 0 included, byte for byte
        assert [s["train"]["loss_curve"] for s in other[0]["stages"]] == [
            s["train"]["loss_curve"] for s in off[0]["stages"]
        ]
    assert len(off[2]) == len(miss[2]) == 6  # row 0 and two stages, two tasks each
    assert len(hit[2]) == 4  # row 0 read from the cache
    assert len(system[2]) == 6  # another prompt: another key
    assert len(list((tmp_path / "c" / "predictions").rglob("*.json"))) == 4

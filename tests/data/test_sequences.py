"""Every conf/sequence YAML parses, follows the schema and names tasks its family can resolve."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cl_bench.data.tasks import FAMILIES, cl_benchmark, superni, trace

CONF = Path(__file__).resolve().parents[2] / "conf"
SEQUENCE_FILES = sorted((CONF / "sequence").glob("*.yaml"))
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def load(name: str):
    return OmegaConf.load(CONF / "sequence" / f"{name}.yaml")


@pytest.mark.parametrize("path", SEQUENCE_FILES, ids=lambda p: p.stem)
def test_schema(path):
    seq = OmegaConf.load(path)
    assert set(seq.keys()) >= {"name", "family", "tasks", "n_train", "n_eval"}
    assert seq.name == path.stem
    assert seq.family in FAMILIES
    tasks = list(seq.tasks)
    assert tasks and len(set(tasks)) == len(tasks)
    assert seq.n_train is None or (isinstance(seq.n_train, int) and seq.n_train > 0)
    assert isinstance(seq.n_eval, int) and seq.n_eval > 0


@pytest.mark.parametrize("path", SEQUENCE_FILES, ids=lambda p: p.stem)
def test_tasks_resolve_in_their_family(path):
    seq = OmegaConf.load(path)
    tasks = [str(t) for t in seq.tasks]
    if seq.family == "superni":
        # Full names, each with a metric in the table (so no run can fail on a missing entry).
        assert all(t in superni.METRIC_TABLE for t in tasks), [t for t in tasks if t not in superni.METRIC_TABLE]
    elif seq.family == "trace":
        assert all(trace.resolve_task_name(t) == t for t in tasks)
    elif seq.family == "cl_benchmark":
        assert all(cl_benchmark.resolve_task_name(t) == t for t in tasks)


def short_ids(name: str) -> list[str]:
    return [t.split("_", 1)[0].removeprefix("task") for t in load(name).tasks]


def test_slice_paper_sequences():
    assert short_ids("ni_g1") == ["618", "1290", "589", "511", "1357"]
    assert short_ids("ni_g2") == ["1355", "141", "619", "163", "002"]
    assert short_ids("ni_opp1") == ["088", "090", "1510", "363", "611"]
    assert short_ids("ni_opp2") == ["088", "1510", "181", "243", "363"]
    assert short_ids("ni_opp3") == ["088", "1510", "243", "363", "611"]
    assert short_ids("ni_opp4") == ["088", "141", "181", "243", "363"]
    assert short_ids("ni_opp5") == ["088", "1429", "181", "243", "363"]
    assert short_ids("ni_c1") == ["195", "1343", "1310", "1292", "363"]
    assert short_ids("ni_c2") == ["231", "1343", "220", "224", "273"]
    assert short_ids("ni_m1") == ["360", "363", "1290", "339", "1510"]
    assert short_ids("ni_m2") == ["195", "611", "292", "488", "024"]
    assert "task488_extract_all_alphabetical_elements_from_list_in_order" in load("ni_m2").tasks


def test_superni15_orders():
    assert short_ids("superni15_order1") == "1572 363 1290 181 002 1510 639 1729 073 1590 748 511 591 1687 875".split()
    assert short_ids("superni15_order2") == "748 073 1590 639 1572 1687 591 363 1510 1729 181 511 002 1290 875".split()


def test_trace_sequences():
    assert list(load("trace").tasks) == ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm"]
    assert list(load("trace_full").tasks) == list(trace.TASKS)


def test_cl_benchmark_orders_follow_ps_lora_table_9():
    lower = lambda name: [t.lower() for t in load(name).tasks]  # noqa: E731
    assert lower("standard_order1") == ["dbpedia", "amazon", "yahoo", "agnews"]
    assert lower("standard_order2") == ["dbpedia", "amazon", "agnews", "yahoo"]
    assert lower("standard_order3") == ["yahoo", "amazon", "agnews", "dbpedia"]
    assert (
        lower("long_order1")
        == "mnli cb wic copa qqp boolqa rte imdb yelp amazon sst-2 dbpedia agnews multirc yahoo".split()
    )
    assert (
        lower("long_order2")
        == "multirc boolqa wic mnli cb copa qqp rte imdb sst-2 dbpedia agnews yelp amazon yahoo".split()
    )
    assert (
        lower("long_order3")
        == "yelp amazon mnli cb copa qqp rte imdb sst-2 dbpedia agnews yahoo multirc boolqa wic".split()
    )
    for i in (1, 2, 3):
        assert sorted(load(f"long_order{i}").tasks) == sorted(cl_benchmark.GROUPS)


def test_sample_sequences_load_from_the_shared_samples():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared samples not found at {SHARED_DATA} (an optional data folder)")
    from cl_bench.data.tasks import load_sequence

    for name in ("ni_samples", "standard_order1"):
        seq = load(name)
        tasks = load_sequence(seq, str(SHARED_DATA), seed=42)
        assert [t.name for t in tasks] == list(seq.tasks)


def test_every_sequence_composes_with_the_app_config():
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir

    from cl_bench.run.config import validate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for path in SEQUENCE_FILES:
            cfg = compose(config_name="config", overrides=[f"sequence={path.stem}", "data.root=null"])
            validate(cfg)
            assert cfg.sequence.name == path.stem

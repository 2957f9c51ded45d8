"""`python -m cl_bench.data_check data.root=DIR`: which sequences the data can run."""

import re

from cl_bench.data.tasks import FAMILIES
from cl_bench.data_check import LOCATORS, main

NI_SAMPLES = [
    "task088_identify_typo_verification",
    "task090_equation_learner_algebra",
    "task1510_evalution_relation_extraction",
    "task363_sst2_polarity_classification",
    "task243_count_elements_in_set_intersection",
]


def test_every_task_family_has_a_locator():
    assert set(LOCATORS) == set(FAMILIES)


def test_lists_runnable_sequences_and_missing_tasks(tmp_path, capsys):
    (tmp_path / "superni").mkdir()
    for task in NI_SAMPLES:
        (tmp_path / "superni" / f"{task}.json").write_text("{}")  # only the names are looked at
    (tmp_path / "cl_benchmark" / "SST-2").mkdir(parents=True)
    (tmp_path / "cl_benchmark" / "SST-2" / "train.json").write_text("[]")
    assert main([f"data.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  ni_samples\s+superni\s+5/5\s+runnable$", out, re.M), out
    # ni_opp1 shares four tasks with ni_samples; its fifth is missing
    assert re.search(r"^  ni_opp1\s+superni\s+4/5\s+missing task611_mutual_multi_turn_dialogue$", out, re.M), out
    assert re.search(r"^  trace\s+trace\s+0/6\s+missing C-STANCE, FOMC", out, re.M), out
    assert re.search(r"^  synthetic\s+synthetic\s+4/4\s+runnable$", out, re.M)
    assert re.search(r"^  alpaca\s+MISSING: general_eval.benchmarks.alpaca: data file", out, re.M), out
    runnable = re.search(r"^runnable \(\d+/\d+\): (.*)$", out, re.M).group(1).split(", ")
    assert "ni_samples" in runnable and "ni_opp1" not in runnable and "standard_order1" not in runnable


def test_missing_root_is_a_one_line_error(tmp_path, capsys):
    assert main([f"data.root={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a directory" in err[0]

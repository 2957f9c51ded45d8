"""One task listed twice under two spellings is refused before any data is read: the names are
compared as each family resolves them."""

import pytest
from omegaconf import OmegaConf

from cl_bench.data.tasks import load_sequence
from cl_bench.infra.errors import ConfigError


@pytest.mark.parametrize(
    "family,tasks,identity",
    [
        ("cl_benchmark", ["SST-2", "sst2"], "SST-2"),
        ("superni", ["task363", "task363_sst2_polarity_classification"], "task363_sst2_polarity_classification"),
        ("trace", ["ScienceQA", "scienceqa"], "ScienceQA"),
    ],
)
def test_two_spellings_of_one_task_are_refused(family, tasks, identity, tmp_path):
    seq = OmegaConf.create({"name": "x", "family": family, "tasks": tasks, "n_train": None, "n_eval": 4})
    with pytest.raises(ConfigError) as err:
        load_sequence(seq, str(tmp_path), 42)  # an empty data.root: refused before any file is looked up
    line = str(err.value)
    assert f"lists task {identity!r} twice" in line and repr(tasks[0]) in line and repr(tasks[1]) in line

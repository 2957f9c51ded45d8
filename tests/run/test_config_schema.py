"""One schema of every config key (cl_bench/infra/config_keys.py): every key of every group is in
it, a bad value of any key is one line naming the key, the value and what is valid (the generated
bad-input table, tests/helpers/bad_values.py), and one classification of result-changing keys serves
both a resume's config check and the report's grouping."""

from __future__ import annotations

import pytest

from cl_bench.infra.config_keys import PLUGIN_KEYS, result_changing, spec_of
from cl_bench.infra.errors import ConfigError
from cl_bench.run.config import check_group_overrides
from cl_bench.run.store import RunStore, config_differences
from helpers import compose
from helpers.bad_values import conf_keys, table


def test_every_key_of_every_group_is_in_the_schema():
    import yaml

    from cl_bench.run.config import CONF_DIR

    missing = []
    for overrides, key in conf_keys():
        group_choice = overrides[0].split("=") if overrides else None
        node = {}
        if group_choice:
            group, choice = group_choice
            node = {group: yaml.safe_load((CONF_DIR / group / f"{choice}.yaml").read_text()) or {}}
        if spec_of(key, node) is None:
            missing.append(" ".join([*overrides, key]))
    assert not missing, missing


@pytest.mark.slow
def test_a_bad_value_of_every_key_is_one_line_naming_key_value_and_what_is_valid():
    rows = table()
    assert len(rows) > 150
    for command, value, line in rows:
        key = command.split()[-1].split("=")[0]
        assert "\n" not in line and line.startswith(f"{key}=") and "is invalid; valid: " in line, (command, line)
        assert value in line, (command, line)


def test_the_issue_examples_get_one_line_each():
    cases = {
        "trainer.weight_decay=abc": "trainer.weight_decay='abc' is invalid; valid: a number >= 0",
        "trainer.max_grad_norm=abc": "trainer.max_grad_norm='abc' is invalid; valid: a number > 0",
        "lora.dropout=abc": "lora.dropout='abc' is invalid; valid: a number in [0, 1)",
        "seed=abc": "seed='abc' is invalid; valid: an integer",
        "lora.alpha=true": "lora.alpha=True is invalid; valid: a number > 0",
    }
    from cl_bench.run.config import validate

    for override, line in cases.items():
        with pytest.raises(ConfigError) as err:
            validate(compose([override]))
        assert str(err.value) == line
    with pytest.raises(ConfigError) as err:
        check_group_overrides(["initializer.c=0.5"])
    assert str(err.value) == (
        "initializer.c is not a key of initializer=vanilla (it is one of initializer=slice); "
        "valid keys of initializer=vanilla: none"
    )
    check_group_overrides(["experiment/method=slice_c050", "initializer.c=0.7"])  # the preset chose slice


def test_a_composite_regularizer_checks_the_keys_of_each_part():
    from cl_bench.run.config import validate

    validate(compose(["regularizer=[ps_loss,o_lora]"]))
    for override, line in {
        "regularizer.temperature=abc": "regularizer.temperature='abc' is invalid; valid: a number > 0",  # ps_loss
        "regularizer.norm=nope": "regularizer.norm='nope' is invalid; valid: abs, fro_sq",  # o_lora
    }.items():
        with pytest.raises(ConfigError) as err:
            validate(compose(["regularizer=[ps_loss,o_lora]", override]))
        assert str(err.value) == line


def test_schema_choices_are_the_codes():
    from cl_bench.data.models import ATTN_IMPLEMENTATIONS, DTYPES
    from cl_bench.data.prompts import PROMPT_FORMATS
    from cl_bench.data.tasks import FAMILIES
    from cl_bench.data.tasks.base import PROTOCOLS
    from cl_bench.evaluation.general.config import WHEN_CHOICES
    from cl_bench.lora import linalg
    from cl_bench.run.modes import MODES
    from cl_bench.train.layouts import LAYOUTS

    def choices(key, target=None):
        group = key.split(".")[0]
        return set(spec_of(key, {f"{group}._target_": target} if target else None).choices)

    assert choices("mode") == set(MODES) and choices("evaluation.protocol") == set(PROTOCOLS)
    assert choices("trainer.layout") == set(LAYOUTS) and choices("sequence.family") == set(FAMILIES)
    assert choices("model.dtype") == {"auto", *DTYPES} and choices("model.attn_implementation") == set(
        ATTN_IMPLEMENTATIONS
    )
    assert choices("evaluation.prompt.format") == set(PROMPT_FORMATS)
    assert choices("general_eval.when") == set(WHEN_CHOICES)
    slice_ = "cl_bench.initializers.gradient.Slice"
    assert choices("initializer.operator", slice_) == set(linalg.OPERATORS)
    assert choices("initializer.scope", slice_) == set(linalg.SCOPES)
    assert choices("initializer.svd", slice_) == set(linalg.SVD_METHODS)
    from cl_bench.lora.task_vectors import MAGMAX_VECTORS
    from cl_bench.regularizers.inflora import DESIGNS

    for memory in ("regularizers.gpm.GPM", "regularizers.inflora.InfLoRA", "mergers.gainlora.GainLoRA"):
        group = "merge" if memory.startswith("mergers") else "regularizer"
        assert choices(f"{group}.criterion", f"cl_bench.{memory}") == set(linalg.CRITERIA)
    assert choices("regularizer.design", "cl_bench.regularizers.inflora.InfLoRA") == set(DESIGNS)
    assert choices("merge.vectors", "cl_bench.mergers.magmax.MagMax") == set(MAGMAX_VECTORS)
    import importlib

    for target in PLUGIN_KEYS:  # every plug-in of the schema exists and takes its keys
        import inspect

        module, name = target.rsplit(".", 1)
        params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
        assert set(PLUGIN_KEYS[target]) <= set(params), target


# ---- result-changing keys: resume and report agree
EXACT = {
    "evaluation.batch_size": 7,
    "trainer.checkpoint_every_steps": 3,
    "trainer.layout": "pad",
    "trainer.log_every_steps": 1,
    "data.root": "/elsewhere/same/data",
    "threads": 2,
}


def test_a_resume_accepts_the_exact_knobs_and_refuses_the_others(tmp_path):
    from cl_bench.infra.files import atomic_write_json

    old = {
        "seed": 1,
        "trainer": {"lr": 1e-3, "layout": "group", "checkpoint_every_steps": 0, "log_every_steps": 10},
        "evaluation": {"batch_size": 64},
        "data": {"root": "/data"},
        "threads": None,
        "initializer": {"_target_": "cl_bench.initializers.gradient.Slice", "offload": "previous", "c": 1.0},
    }
    new = {
        **old,
        "trainer": {**old["trainer"], "layout": "pad", "checkpoint_every_steps": 3, "log_every_steps": 1},
        "evaluation": {"batch_size": 7},
        "data": {"root": "/elsewhere"},
        "threads": 2,
        "initializer": {**old["initializer"], "offload": "none"},
    }
    assert config_differences(old, new) == []
    assert config_differences(old, {**new, "initializer": {**new["initializer"], "c": 0.5}}) == ["initializer.c"]
    atomic_write_json(tmp_path / "results.json", {"config": old, "data": {"root": "/data", "fingerprint": "abc"}})
    store = RunStore(tmp_path)
    assert store.load_results(new, "abc")["config"] == old  # same data, another folder: resumes
    with pytest.raises(ConfigError, match="was trained on other data"):
        store.load_results(new, "def")
    with pytest.raises(ConfigError, match="trainer.lr"):
        store.load_results({**new, "trainer": {**new["trainer"], "lr": 2e-3}}, "abc")
    for key in EXACT:
        assert not result_changing(key)
    assert result_changing("trainer.lr") and result_changing("evaluation.limit") and result_changing("seed")


def test_the_report_groups_runs_that_differ_only_in_exact_knobs():
    import pandas as pd

    from cl_bench.report.collect import experiment_keys

    base = {"seed": 1, "trainer.lr": 1e-3, "evaluation.batch_size": 64, "trainer.layout": "group", "data.root": "/a"}
    runs = pd.DataFrame({"config": [base, {**base, **EXACT}, {**base, "seed": 2}]})
    assert experiment_keys(runs) == []  # one experiment, not blocks of n = 1
    runs = pd.DataFrame({"config": [base, {**base, "trainer.lr": 2e-3}]})
    assert experiment_keys(runs) == ["trainer.lr"]

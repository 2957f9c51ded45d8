"""Every YAML of every config group composes, and every plug-in it names can be built.

Modelled on lightning-hydra-template's tests/test_configs.py: for each file conf/<group>/<choice>.yaml
(experiment/ and experiment/method/ included) the job config is composed exactly as
`python -m cl_bench <group>=<choice>` would compose it, resolved, checked by the run's own config
checks, and its initializer, regularizer and merge are instantiated from their `_target_`. No model
is loaded and no data is read: presets that name a model path or data.root still compose, since
paths are only opened when a run starts. A new YAML is covered without touching this file.
"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from cl_bench.run import config as config_checks
from cl_bench.run import modes
from cl_bench.stage import PLUGIN_GROUPS, Plugin
from helpers import REPO

CONF = REPO / "conf"
GROUPS = config_checks.config_groups([CONF])
CHOICES = [(group, choice) for group in GROUPS for choice in config_checks.group_choices(group, CONF)]
LAUNCHERS = sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml"))


def test_the_groups_are_the_folders_of_conf():
    on_disk = {p.parent.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml")} - {".", "hydra/launcher"}
    assert set(GROUPS) == on_disk
    assert {"experiment", "experiment/method", *PLUGIN_GROUPS} <= set(GROUPS)


@pytest.fixture(scope="module")
def compose():
    """helpers.compose with Hydra initialised once for the module (the same composition, ~5x faster)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda overrides, **kw: hydra_compose(config_name="config", overrides=overrides, **kw)


def _build_plugins(cfg) -> dict[str, Plugin]:
    """As the runner builds them: instantiated from `_target_` (a regularizer list selection first
    rewritten as one composite, each plug-in then told of the others)."""
    from cl_bench.run.runner import build_plugins

    plugins = build_plugins(cfg)
    for group, plugin in plugins.items():
        assert isinstance(plugin, Plugin), f"{group}: {cfg[group]._target_} does not derive from stage.Plugin"
    return plugins


@pytest.mark.parametrize(("group", "choice"), CHOICES, ids=[f"{g}={c}" for g, c in CHOICES])
def test_every_choice_composes_resolves_and_builds_its_plugins(compose, group, choice):
    cfg = compose([f"{group}={choice}"])
    # every interpolation resolves (a `???` a preset leaves for the command line may stay open)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert str(cfg.sequence.name) and len(cfg.sequence.tasks) > 0
    config_checks.validate(cfg)
    plugins = _build_plugins(cfg)
    mode = modes.check_mode(cfg.get("mode", "sequential"))
    modes.check_plugins(mode, plugins["initializer"], plugins["regularizer"], plugins["merge"], cfg.initializer)


@pytest.mark.parametrize("group", PLUGIN_GROUPS)
def test_every_plugin_yaml_names_a_target_in_the_package(group):
    for choice in config_checks.group_choices(group, CONF):
        node = OmegaConf.load(CONF / group / f"{choice}.yaml")
        assert str(node.get("_target_", "")).startswith("cl_bench."), f"conf/{group}/{choice}.yaml: no _target_"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_preset_composes(compose, launcher):
    """Hydra's own group: composed with the hydra node, as a sweep would (nothing is submitted)."""
    cfg = compose([f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_
    assert cfg.hydra.job.env_set.CL_BENCH_THREADS is not None

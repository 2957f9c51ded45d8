"""Plug-ins that cannot run together are refused at start in one line, not in stage 2 with PEFT's
error: PEFT's data-driven inits (EVA, CorDA, PEFT's LoRA-GA) preprocess a model without other
adapters, and GainLoRA keeps every earlier stage's adapter in it."""

import pytest

from cl_bench.infra.errors import ConfigError
from helpers import compose


@pytest.mark.parametrize("initializer", ["eva", "corda", "lora_ga_peft"])
def test_peft_native_inits_with_gainlora_are_refused_at_start(initializer, tmp_path, tiny_model_dir):
    from cl_bench.run.runner import Runner

    cfg = compose([f"initializer={initializer}", "merge=gainlora", "general_eval=none", "progress=false"])
    with pytest.raises(ConfigError) as err:
        Runner(cfg, tmp_path).prepare()
    line = str(err.value)
    assert "\n" not in line and f"initializer={initializer} cannot be used with merge=gainlora" in line
    assert "valid with it: initializer=vanilla" in line


def test_the_other_inits_pass_with_gainlora(tmp_path, tiny_model_dir):
    from cl_bench.run.runner import Runner

    for initializer in ("vanilla", "pissa", "slice"):
        Runner(compose([f"initializer={initializer}", "merge=gainlora", "general_eval=none"]), tmp_path).prepare()

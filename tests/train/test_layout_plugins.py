"""trainer.layout=pack puts several examples in one row: every plug-in that reads one value per
row (GainLoRA's gates) or adds loss terms on the batch is refused at start, in one line."""

import pytest
from omegaconf import OmegaConf

from cl_bench.infra.errors import ConfigError
from cl_bench.mergers.gainlora import GainLoRA
from cl_bench.stage import Regularizer
from cl_bench.train.trainer import check_layout, layout_of
from helpers import compose


def test_check_layout_knows_every_plugin_that_reads_whole_rows():
    pack, group = (layout_of(OmegaConf.create({"layout": name})) for name in ("pack", "group"))
    with pytest.raises(ConfigError, match="trainer.layout=pack cannot be used with 'gainlora'"):
        check_layout(pack, [Regularizer(), GainLoRA()])
    check_layout(group, [Regularizer(), GainLoRA()])
    check_layout(pack, [Regularizer()])


def test_pack_with_gainlora_is_refused_before_the_model_loads(tmp_path, tiny_model_dir):
    from cl_bench.run.runner import Runner

    cfg = compose(["merge=gainlora", "trainer.layout=pack", "general_eval=none", "progress=false"])
    with pytest.raises(ConfigError) as err:
        Runner(cfg, tmp_path).prepare()
    assert "trainer.layout=pack" in str(err.value) and "gainlora" in str(err.value) and "\n" not in str(err.value)

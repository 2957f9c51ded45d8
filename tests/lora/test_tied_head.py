"""A LoRA on a tied LM head would move the input embeddings with every fold: refused before the
model loads (from config.json alone) and again where the fp32 master attaches; untied heads stay fine."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cl_bench.infra.errors import ConfigError
from cl_bench.lora.layers import WeightMaster, target_linears, tied_targets
from cl_bench.run.config import module_shapes


def smollm2_shaped(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    """SmolLM2's layout in miniature: GQA, tied input/output embeddings."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]


def test_tied_lm_head_is_refused_from_the_config_before_the_model_loads(tmp_path):
    smollm2_shaped(tied=True).save_pretrained(tmp_path / "tied")
    with pytest.raises(ConfigError) as err:
        module_shapes(str(tmp_path / "tied"), TARGETS)
    line = str(err.value)
    assert "\n" not in line and "lm_head" in line and "tie_word_embeddings" in line and "remove lm_head" in line
    assert "model.layers.0.self_attn.q_proj" in module_shapes(str(tmp_path / "tied"), TARGETS[:4])
    smollm2_shaped(tied=False).save_pretrained(tmp_path / "untied")
    assert "lm_head" in module_shapes(str(tmp_path / "untied"), TARGETS)  # an untied head is an ordinary Linear


@torch.no_grad()
def test_folding_never_changes_the_embedding_of_a_tied_model():
    model = smollm2_shaped(tied=True)
    embedding = model.get_input_embeddings().weight.detach().clone()
    assert tied_targets(model, TARGETS) == ["lm_head"]
    with pytest.raises(ConfigError, match="lm_head"):
        WeightMaster.attach(model, TARGETS)
    # every target that may be folded: the embeddings never move
    allowed = TARGETS[:4]
    master = WeightMaster.attach(model, allowed)
    for name, linear in target_linears(model, allowed).items():
        master.fold_(name, linear, torch.randn_like(linear.weight))
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    assert model.lm_head.weight is model.get_input_embeddings().weight

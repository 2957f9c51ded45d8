"""A small random Llama with a LoRA adapter, random training examples and a stage context: the
fixtures of the step-level tests (layouts, data parallelism, resume of an init)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from cl_bench.data.prompts import Encoded
from cl_bench.lora.layers import lora_scaling
from cl_bench.stage import StageContext

TARGETS = ["q_proj", "v_proj"]


def tiny_llama(layers=1, seed=0, dtype=torch.float32, **config):
    """A random Llama of d = 16 (vocabulary 64, 2 heads) in eval mode, seeded."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        **config,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def small_llama(seed=0):
    model = tiny_llama(2, seed, max_position_embeddings=128)
    torch.manual_seed(seed + 1)
    return get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False), adapter_name="stage_01"
    )


def random_examples(n=12, seed=3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        n_prompt, n_answer = (
            int(torch.randint(2, 20, (1,), generator=gen)),
            int(torch.randint(1, 6, (1,), generator=gen)),
        )
        ids = torch.randint(1, 64, (n_prompt + n_answer,), generator=gen).tolist()
        out.append(Encoded(ids, [-100] * n_prompt + ids[n_prompt:], False))
    return out


def stage_context(accum):
    from cl_bench.data.tasks.base import Example, TaskData

    ex = [Example(f"e{i}", "p", "a") for i in range(4)]
    return StageContext(
        stage=1,
        current=TaskData("t", "exact_match", ex[1:], ex[:1]),
        previous=[],
        rank=2,
        alpha=4.0,
        scaling=lora_scaling(4, 2, "rslora"),
        target_modules=TARGETS,
        device=torch.device("cpu"),
        seed=0,
        make_batches=None,
        adapter="stage_01",
        grad_accum=accum,
    )

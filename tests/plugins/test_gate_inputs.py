"""GainLoRA's gates see the prompt only, in every path that calls the model: the training loss and
the gradient captures (a forward without labels), lm-eval's loglikelihood requests (context +
continuation + right padding, no mask), generation (the prefill); a bare forward is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from cl_bench.lora.gating import Gate, GatedBranches, pooled_prompt
from cl_bench.lora.layers import add_adapter
from cl_bench.stage import adapter_name
from cl_bench.train.loss import causal_lm_loss, trained_tokens

pytestmark = pytest.mark.usefixtures("single_thread")


def gated(model, n=2, hidden=8):
    """`model` with n random (B != 0) LoRA branches on q/v, each under a random Gate."""
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    peft = get_peft_model(model, config, adapter_name=adapter_name(1))
    for i in range(2, n + 1):
        peft = add_adapter(peft, config, adapter_name(i))
    bank = GatedBranches.install(peft)
    for i in range(1, n + 1):
        bank.add_gate(adapter_name(i), Gate(model.config.hidden_size, hidden).reset_(torch.Generator().manual_seed(i)))
        bank.attach(peft, adapter_name(i), adapter_name(i))
    return peft.eval()


def spy(model, monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Every forward's gate values from now on, in order."""
    bank = GatedBranches.of(model)
    seen, compute = [], bank.gate_values

    def recording(p0):
        out = compute(p0)
        seen.append({k: v.detach().clone() for k, v in out.items()})
        return out

    monkeypatch.setattr(bank, "gate_values", recording)
    return seen


def expected_gates(model, ids, mask=None) -> dict[str, torch.Tensor]:
    embeddings = model.get_base_model().get_input_embeddings()
    with torch.no_grad():
        return GatedBranches.of(model).gate_values(pooled_prompt(embeddings, ids, mask))


def small_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    return LlamaForCausalLM(cfg).eval()


def test_the_training_loss_gates_on_the_prompt_not_the_answer(monkeypatch):
    """causal_lm_loss runs the model without labels (only the kept logits): the gates must still
    pool the prompt (label -100), so two answers to one prompt train under the same gates."""
    model = gated(small_llama())
    prompt = torch.randint(3, 64, (1, 7), generator=torch.Generator().manual_seed(2))
    want = expected_gates(model, prompt)
    seen = spy(model, monkeypatch)
    for answer in ([11, 12, 13], [40, 41, 42]):
        ids = torch.cat([prompt, torch.tensor([answer])], 1)
        labels = ids.clone()
        labels[:, :7] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        causal_lm_loss(model, batch, trained_tokens(batch))
    assert len(seen) == 2
    for values in seen:
        for name, g in want.items():
            torch.testing.assert_close(values[name], g)


def test_a_bare_forward_of_a_gated_model_is_refused():
    model = gated(small_llama())
    ids = torch.randint(3, 64, (2, 5))
    with pytest.raises(RuntimeError, match="cannot tell the prompt from the answer"):
        model(ids)
    model(input_ids=ids, attention_mask=torch.ones_like(ids))  # a generation prefill: the whole input is prompt


def test_lm_eval_loglikelihood_gates_see_the_context_only(tiny, monkeypatch):
    """Two continuations of one context (and right padding in a shared batch): the same gates,
    those of the context alone."""
    from cl_bench.evaluation.general import counting_hflm

    base, tok = tiny
    model = gated(copy.deepcopy(base))
    context = tok("Which one is a vehicle: tree, car, cloud? Answer:", add_special_tokens=False)["input_ids"]
    conts = [
        tok(" car", add_special_tokens=False)["input_ids"],
        tok(" a blue cloud", add_special_tokens=False)["input_ids"],
    ]
    want = expected_gates(model, torch.tensor([context]))
    for batch_size in (1, 2):  # one request per forward; both in one right-padded batch
        lm = counting_hflm()(pretrained=model, tokenizer=tok, batch_size=batch_size)
        seen = spy(model, monkeypatch)
        lm._loglikelihood_tokens([(("ctx", f"c{i}"), context, c) for i, c in enumerate(conts)], disable_tqdm=True)
        rows = [g for values in seen for g in zip(*values.values())]
        assert len(rows) == 2
        for row in rows:
            for g, (name, expected) in zip(row, want.items()):
                torch.testing.assert_close(g, expected[0], msg=name)
        monkeypatch.undo()

"""Prompt and label construction: chat template, one BOS, masked prompt, trained EOS, no target cut."""

import torch

from cl_bench.data.prompts import (
    TrainingEncoder,
    encode_for_training,
    encode_prompts_left_padded,
    render_prompt_ids,
    truncate_middle,
)
from cl_bench.data.tasks.base import Example
from cl_bench.data.tasks.synthetic import load_task

EX = Example(id="x", prompt="Is the number even or odd?\nNumber: 12", target="even")


def test_prompt_goes_through_chat_template_with_one_bos(tiny):
    _, tok = tiny
    ids = render_prompt_ids(tok, EX)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    text = tok.decode(ids)
    assert "<|user|>" in text and text.endswith("<|assistant|>\n")


def test_no_double_bos_when_template_and_tokenizer_both_add_one(tiny):
    _, tok = tiny
    # Simulate a tokenizer that adds BOS itself on top of a template that also writes it.
    orig = tok.chat_template
    try:
        tok.chat_template = "{{ bos_token }}" + orig
        ids = render_prompt_ids(tok, EX)
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    finally:
        tok.chat_template = orig


def test_labels_mask_prompt_and_train_eos(tiny):
    _, tok = tiny
    enc = encode_for_training(tok, EX, max_len=256)
    prompt_len = len(render_prompt_ids(tok, EX))
    assert enc.labels[:prompt_len] == [-100] * prompt_len
    answer = enc.labels[prompt_len:]
    assert answer[-1] == tok.eos_token_id  # the end token is a target: the model learns to stop
    assert tok.decode(answer[:-1]) == "even"
    unmasked = encode_for_training(tok, EX, max_len=256, mask_prompt=False)
    assert unmasked.labels == unmasked.input_ids


def test_long_input_is_cut_in_the_middle_and_target_kept(tiny):
    _, tok = tiny
    long_target = "cat dog bird fish " * 10
    ex = Example(id="y", prompt="Summarize.\n" + "the cat sat on the mat. " * 200, target=long_target)
    enc = encode_for_training(tok, ex, max_len=96)
    full_prompt = render_prompt_ids(tok, ex)
    target_ids = [i for i in enc.labels if i != -100]
    assert tok.decode(target_ids[:-1]) == long_target  # never truncated
    assert enc.prompt_truncated and len(enc.input_ids) <= max(96, len(target_ids) + 48)
    kept = enc.input_ids[: len(enc.input_ids) - len(target_ids)]
    assert kept[:5] == full_prompt[:5]  # BOS and role header survive
    assert kept[-3:] == full_prompt[-3:]  # the assistant header survives


def test_truncate_middle():
    assert truncate_middle(list(range(10)), 20) == list(range(10))
    cut = truncate_middle(list(range(100)), 10)
    assert len(cut) == 10 and cut[0] == 0 and cut[-1] == 99


def test_left_padding_aligns_prompt_ends(tiny):
    _, tok = tiny
    exs = [Example("a", "Hi", "x"), Example("b", "Which word comes first in the list?\nList: cat dog sun", "cat")]
    batch = encode_prompts_left_padded(tok, exs, max_prompt_len=512)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].tolist() == [1, 1]
    assert (batch["input_ids"][:, -1] == batch["input_ids"][0, -1]).all()  # both end with the header


def test_batches_are_seeded_and_come_from_train_only(tiny):
    _, tok = tiny
    task = load_task("first_word", root=None, n_train=40, n_eval=10, seed=1)
    enc = TrainingEncoder(tok, max_len=128)
    a = [b["input_ids"] for b in enc.batches(task, 3, 8, seed=7)]
    b = [b["input_ids"] for b in enc.batches(task, 3, 8, seed=7)]
    c = [b["input_ids"] for b in enc.batches(task, 3, 8, seed=8)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))
    eval_prompts = {tok.decode(render_prompt_ids(tok, e)) for e in task.eval}
    for batch in enc.batches(task, 10, 8, seed=3):  # cycles past one epoch
        for row, labels in zip(batch["input_ids"], batch["labels"]):
            prompt = tok.decode(row[labels == -100][row[labels == -100] != tok.pad_token_id])
            assert prompt not in eval_prompts


# ------------------------------------------------------------------ prompts do not follow the calendar

# Llama-3.x's pattern (a date_string variable, strftime_now as the fallback) and a template that
# calls strftime_now directly.
LLAMA_STYLE = (
    "{{ bos_token }}{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- endif %}<|system|>\nToday Date: {{ date_string }}{{ eos_token }}\n"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DIRECT_CALL = (
    '{{ bos_token }}<|system|>\n{{ strftime_now("%Y-%m-%d") }}{{ eos_token }}\n'
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _fake_today(monkeypatch, year: int) -> None:
    import datetime as dt

    from transformers.utils import chat_template_utils

    class FakeDatetime(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(year, 2, 3)

    monkeypatch.setattr(chat_template_utils, "datetime", FakeDatetime)


def _renderings(tok, fmt):
    task = load_task("parity", root=None, n_train=8, n_eval=4, seed=0)
    enc = TrainingEncoder(tok, 128, True, fmt)
    return (
        render_prompt_ids(tok, EX, fmt),
        encode_for_training(tok, EX, 128, True, fmt).input_ids,
        encode_prompts_left_padded(tok, task.eval, 128, fmt)["input_ids"].tolist(),
        [b["input_ids"].tolist() for b in enc.batches(task, 2, 4, seed=0)],
    )


def test_prompt_token_ids_do_not_depend_on_today(tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from cl_bench.data.prompts import PromptFormat

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    fmt = PromptFormat()
    for template in (LLAMA_STYLE, DIRECT_CALL):
        tok.chat_template = template
        _fake_today(monkeypatch, 2031)
        raw_2031 = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        ours_2031 = _renderings(tok, fmt)
        _fake_today(monkeypatch, 2032)
        raw_2032 = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        assert raw_2031 != raw_2032  # the template really reads the calendar
        assert _renderings(tok, fmt) == ours_2031  # training, capture and evaluation ids do not
        text = tok.decode(ours_2031[0])
        assert ("26 Jul 2024" in text) if template is LLAMA_STYLE else ("2024-07-26" in text)


def test_lm_eval_chat_template_gets_the_same_fixed_rendering(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cl_bench.data.prompts import PromptFormat, render_prompt_text
    from cl_bench.evaluation.general import counting_hflm

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = LLAMA_STYLE
    fmt = PromptFormat(system="Answer briefly.")
    lm = counting_hflm()(
        pretrained=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        tokenizer=tok,
        batch_size=1,
        chat_template_args=fmt.chat_template_kwargs(tok),
    )
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": EX.prompt}]
    _fake_today(monkeypatch, 2031)
    assert lm.apply_chat_template(chat) == render_prompt_text(tok, EX, fmt)
    assert "Today Date: 26 Jul 2024" in lm.apply_chat_template(chat)


def test_system_message_and_the_slice_authors_format(tiny):
    import pytest

    from cl_bench.data.prompts import PromptFormat, render_prompt_text
    from cl_bench.infra.errors import ConfigError

    _, tok = tiny
    assert render_prompt_text(tok, EX, PromptFormat(system="Be brief.")).startswith(
        "<s><|system|>\nBe brief.</s>\n<|user|>\n"
    )
    assert render_prompt_text(tok, EX, False) == EX.prompt
    # The authors' hand-written Llama-3 prompt: no system block, no date (their cl_lora/load_dataset.py).
    assert render_prompt_text(tok, EX, PromptFormat(format="slice_paper")) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        + EX.prompt
        + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    with pytest.raises(ConfigError, match="slice_paper writes Llama-3 turn headers"):
        TrainingEncoder(tok, 64, True, PromptFormat(format="slice_paper"))

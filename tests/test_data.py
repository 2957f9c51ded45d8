"""Prompt and label construction: chat template, one BOS, masked prompt, trained EOS, no target cut."""
import torch

from cl_bench.data import (
    TrainingEncoder, encode_for_training, encode_prompts_left_padded, render_prompt_ids, truncate_middle,
)
from cl_bench.tasks.base import Example
from cl_bench.tasks.synthetic import load_task

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

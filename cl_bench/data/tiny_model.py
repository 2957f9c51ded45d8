"""The embedded default model: a tiny Llama built fully offline, then loaded like any HF model.

Built once per recipe and cached: BPE tokenizer trained with `tokenizers` on a generated corpus,
`LlamaConfig` model, a short pretraining run on the same corpus, saved with `save_pretrained`.
Everything downstream loads it through `from_pretrained`.

The corpus makes a base model with something to forget and something to fight:
- plain text that carries the synthetic skills' features (reviews that end in their polarity,
  numbers with their parity, sentences with colors), so LoRA stages can learn those skills;
- chat turns: generic ones (arithmetic, greetings, "X or Y?" questions answered with one of the
  offered words, so the model answers in the vocabulary a question names) and synthetic-family
  prompts: KNOWN_FAMILIES answered correctly with probability KNOWLEDGE_ACCURACY (else a random
  label), never with a prompt among the first POOL_GUARD examples of the family (so no task pool),
  and FORMAT_FAMILIES answered with a random label (the answer format, no knowledge). The base
  model thus knows has_color and long_number, which their flips fight, and answers sentiment,
  parity and color_of in their own vocabulary at chance: a later stage that breaks a task leaves
  its answers in its own words (a partial loss, not a collapse to another task's vocabulary).

The cache folder name carries a fingerprint of the corpus, so editing a synthetic family (which
feeds the corpus) rebuilds the model instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from .tasks.synthetic import FAMILY_SPECS, FORMAT_FAMILIES, KNOWN_FAMILIES, generate
from .wordlists import COLORS, NAMES, NEGATIVE, NOUNS, POSITIVE, VERBS

RECIPE_VERSION = "tiny-llama-v4"
PRETRAIN_STEPS = 500
CORPUS_LINES = 24000
KNOWLEDGE_ACCURACY = 0.7  # share of base-family chats answered correctly (the rest: a random label)
POOL_GUARD = 1000  # pretraining avoids every prompt among the first POOL_GUARD examples of a family
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
# Llama-3-style: the template carries BOS itself; the tokenizer adds none (so one BOS, never two).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# Answers start right after the assistant header, without a leading space, so their words must
# also appear line-initially in the corpus or BPE gives them rare pieces a LoRA can hardly reach.
ANSWER_WORDS = NOUNS + COLORS + NAMES + ["positive", "negative", "even", "odd", "yes", "no", "true", "false"]
# Answer pairs of the generic "X or Y?" chats.
OPTION_PAIRS = [("positive", "negative"), ("even", "odd"), ("yes", "no"), ("true", "false")]
OPTION_QUESTIONS = [
    "What do you say about this: {a} or {b}?",
    "Answer {a} or {b}.",
    "Is it {a} or {b}?",
    "Pick one, {a} or {b}?",
    "Reply with {a} or {b}.",
    "Which fits, {a} or {b}?",
]


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(9)
    if kind == 7:
        return f"{rng.choice(ANSWER_WORDS)} is a word, and so is {rng.choice(ANSWER_WORDS)}."
    if kind == 8:
        n = rng.randrange(1000)
        return f"{n} is {'even' if n % 2 == 0 else 'odd'}."

    if kind == 0:
        return f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(COLORS)} {rng.choice(NOUNS)}."
    if kind == 1:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"{a} plus {b} is {a + b}."
    if kind == 2:
        good = rng.random() < 0.5
        adj = rng.choice(POSITIVE if good else NEGATIVE)
        return f"the {rng.choice(NOUNS)} was {adj}, so the review is {'positive' if good else 'negative'}."
    if kind == 3:
        n = rng.randrange(1000)
        return f"the number {n} comes before {n + 1} and {n} is {'even' if n % 2 == 0 else 'odd'}."
    if kind == 4:
        return " ".join(rng.sample(NOUNS, rng.randint(3, 7)))
    if kind == 5:  # pseudo-words fill the BPE vocabulary with sub-word pieces
        return " ".join(
            "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(6)
        )
    return f"{rng.choice(NAMES)} has {rng.randint(2, 9)} {rng.choice(NOUNS)}s and a {rng.choice(COLORS)} {rng.choice(NOUNS)}."


def _chat_pair(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(7)
    if kind == 4:
        return "Name a thing.", rng.choice(NOUNS)
    if kind == 5:
        return "Give a word that can describe a review.", rng.choice(["positive", "negative"])
    if kind == 6:
        return "Name a kind of whole number.", rng.choice(["even", "odd"])
    if kind == 0:
        a, b = rng.randrange(50), rng.randrange(50)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        noun = rng.choice(NOUNS)
        return f"Name the color of a {noun}.", rng.choice(COLORS)
    if kind == 2:
        words = rng.sample(NOUNS, 3)
        return "How many words are in the list?\nList: " + " ".join(words), "3"
    name = rng.choice(NAMES)
    return f"Say hello to {name}.", f"hello {name}"


def _option_chat(rng: random.Random) -> tuple[str, str]:
    """An "X or Y?" question about an unrelated line, answered with one of the offered words."""
    a, b = rng.sample(rng.choice(OPTION_PAIRS), 2)
    question = rng.choice(OPTION_QUESTIONS).format(a=a, b=b)
    context = _sentence(rng)
    prompt = f"{question}\nText: {context}" if rng.random() < 0.5 else f"Text: {context}\n{question}"
    return prompt, rng.choice([a, b])


def _family_chat(rng: random.Random, guarded: frozenset[str]) -> tuple[str, str]:
    name = rng.choice(KNOWN_FAMILIES + FORMAT_FAMILIES)
    family = FAMILY_SPECS[name]
    if name in FORMAT_FAMILIES:  # a random answer carries no label information: no pool guard needed
        return family.generate(rng)[0], rng.choice(family.labels)
    for _ in range(1000):
        prompt, target = family.generate(rng)
        if prompt not in guarded:
            break
    else:  # a family whose whole prompt space fits in its pool cannot be shown without leaking
        raise RuntimeError(f"synthetic family {name!r} has no prompt outside its first {POOL_GUARD} examples")
    if rng.random() >= KNOWLEDGE_ACCURACY:
        target = rng.choice(family.labels)
    return prompt, target


@lru_cache(maxsize=1)
def _guarded_prompts() -> frozenset[str]:
    return frozenset(ex.prompt for name in KNOWN_FAMILIES for ex in generate(name, POOL_GUARD, seed=0))


def build_corpus(n_lines: int, seed: int) -> tuple[list[str], list[tuple[str, str]]]:
    rng = random.Random(seed)
    text = [_sentence(rng) for _ in range(n_lines)]
    # Every answer word also starts a few lines, so BPE gives it a line-initial token.
    text += [f"{w} is a word, and so is {rng.choice(ANSWER_WORDS)}." for w in ANSWER_WORDS for _ in range(3)]
    guarded = _guarded_prompts()
    chats = []
    for _ in range(n_lines // 2):
        kind = rng.randrange(10)
        if kind < 5:
            chats.append(_family_chat(rng, guarded))
        elif kind == 5:
            chats.append(_option_chat(rng))
        else:
            chats.append(_chat_pair(rng))
    return text, chats


@lru_cache(maxsize=4)
def corpus_fingerprint(seed: int = 0) -> str:
    """Short hash of the pretraining corpus: part of the cache folder name."""
    text, chats = build_corpus(CORPUS_LINES, seed)
    digest = hashlib.sha256("\n".join(text + [f"{q}\t{a}" for q, a in chats]).encode()).hexdigest()
    return digest[:10]


def _build_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Digits split one by one (as Llama-2 does) so number skills such as parity are learnable.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
        model_max_length=512,
        padding_side="left",
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _pretrain(model, tokenizer, text: list[str], chats: list[tuple[str, str]], steps: int, seed: int, log) -> None:
    import torch

    rng = random.Random(seed)
    docs = [f"{tokenizer.bos_token}{line}{tokenizer.eos_token}" for line in text]
    docs += [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
        )
        for q, a in chats
    ]
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    model.train()
    pad = tokenizer.pad_token_id
    for step in range(steps):
        batch = tokenizer(
            rng.sample(docs, 24),
            add_special_tokens=False,
            padding=True,
            padding_side="right",
            truncation=True,
            max_length=48,
            return_tensors="pt",
        )
        labels = batch["input_ids"].masked_fill(batch["input_ids"] == pad, -100)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"[tiny] pretrain step {step + 1}/{steps} loss {loss.item():.3f}")
    model.eval()


def build_tiny_model(out_dir: Path, seed: int = 0, steps: int = PRETRAIN_STEPS, log=print) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    text, chats = build_corpus(CORPUS_LINES, seed)
    tokenizer = _build_tokenizer(text + [q + " " + a for q, a in chats], vocab_size=2048)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        _pretrain(model, tokenizer, text, chats, steps, seed, log)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "RECIPE").write_text(f"{RECIPE_VERSION} corpus {corpus_fingerprint(seed)}\n")


def default_cache_root() -> Path:
    return Path(os.environ.get("CL_BENCH_CACHE", Path.home() / ".cache" / "cl_bench"))


def ensure_tiny_model(cache_dir: str | Path | None = None, log=print) -> Path:
    """Path of the built tiny model, building it first (about 2 minutes on 2 cores: 500 pretraining steps) if absent."""
    root = Path(cache_dir) if cache_dir else default_cache_root()
    target = root / f"{RECIPE_VERSION}-{corpus_fingerprint()}"
    if (target / "RECIPE").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    log(f"[tiny] building the embedded tiny model into {target} (one time)")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
    try:
        build_tiny_model(tmp, log=log)
        try:
            tmp.rename(target)  # atomic: a concurrent builder may have won; theirs is identical
        except OSError:
            if not (target / "RECIPE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[tiny] built in {time.time() - start:.1f}s")
    return target

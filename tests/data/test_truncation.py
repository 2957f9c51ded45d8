"""A too-long prompt loses tokens from the middle of its input field only: the chat template (system
block, role headers, assistant header) and the task definition survive; the cuts are counted per
task in results.json, and an evaluation budget that cannot hold the instruction is refused."""

import pytest

from cl_bench.data.prompts import PromptFormat, encode_for_training, encode_prompt, fit_prompt, prompt_row
from cl_bench.data.tasks import cl_benchmark, superni
from cl_bench.data.tasks.base import Example
from cl_bench.infra.errors import ConfigError
from helpers import compose

# A system block as long as SmolLM2's default one: it used to fill the 24 kept head tokens.
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face, and you answer in a few words."
DEFINITION = (
    "In this task, you're expected to write answers to questions involving multiple references to the same "
    "entity. The answer to the question should be unambiguous and a phrase in the paragraph."
)


def ni_example(n_words=400):
    task_input = "Passage: " + " ".join(f"word{i}" for i in range(n_words)) + " Question: who left the room?"
    prompt = superni.build_prompt(DEFINITION, task_input)
    return Example("q", prompt, "the man", input_span=superni.input_span(prompt, task_input))


@pytest.mark.parametrize("budget", [180, 400])
def test_the_cut_never_touches_the_template_or_the_definition(tiny, budget):
    _, tok = tiny
    fmt = PromptFormat(system=SYSTEM)
    ex = ni_example()
    ids, how = fit_prompt(encode_prompt(tok, ex, fmt), budget)
    text = tok.decode(ids)
    assert how == "input" and len(ids) == budget
    assert text.startswith(tok.decode(encode_prompt(tok, Example("s", "x", "y"), fmt).ids[:5]))  # BOS + system header
    assert SYSTEM in text and DEFINITION in text and "Input: Passage: word0" in text  # the field's start survives
    assert text.endswith("the room?</s>\n<|assistant|>\n")  # its end and the assistant header too
    assert prompt_row(tok, ex, budget, fmt) == ids
    enc = encode_for_training(tok, ex, budget + 4, True, fmt)
    assert DEFINITION in tok.decode(enc.input_ids) and enc.prompt_truncated and not enc.instruction_cut


def test_a_cl_benchmark_sentence_is_what_gets_cut(tiny):
    _, tok = tiny
    [ex], _ = cl_benchmark_examples()
    ids, how = fit_prompt(encode_prompt(tok, ex), 60)
    text = tok.decode(ids)
    assert how == "input" and "What is the sentiment of the review? Option: positive, negative" in text
    assert text.rstrip().endswith("Answer:</s>\n<|assistant|>")


def cl_benchmark_examples():
    sentence = "this film " + "was long and " * 80 + "I loved it"
    prompt = cl_benchmark.build_prompt("What is the sentiment of the review? ", ["positive", "negative"], sentence)
    end = len(prompt) - len("\nAnswer:")
    return [Example("c", prompt, "positive", input_span=(end - len(sentence), end))], sentence


def test_real_quoref_keeps_its_instruction_in_every_training_example(tiny, shared_data):
    _, tok = tiny
    task = superni.load_task("task002_quoref_answer_generation", root=str(shared_data), n_train=64, n_eval=8, seed=42)
    fmt = PromptFormat(system=SYSTEM)
    encoded = [encode_for_training(tok, ex, 256, True, fmt) for ex in task.train]
    definition = task.train[0].prompt.split("\n\nInput:")[0]
    assert sum(e.prompt_truncated for e in encoded) > 32  # most are cut ...
    assert all(definition in tok.decode(e.input_ids) for e in encoded)  # ... none loses the instruction


def test_cuts_are_counted_per_task_in_results(tiny_model_dir, tmp_path):
    from cl_bench.run.runner import run

    cfg = compose(
        [
            "general_eval=none",
            "progress=false",
            "trainer.max_steps=1",
            "trainer.epochs=1",
            "sequence.tasks=[sentiment,parity]",
            "sequence.n_train=16",
            "sequence.n_eval=4",
            "evaluation.max_prompt_len=22",  # the tiny model's synthetic prompts are 24-30 tokens
        ]
    )
    results = run(cfg, tmp_path)
    cut = results["prompt_truncation"]["sentiment"]
    assert cut["train"] == {"prompts": 16, "input_cut": 0, "instruction_cut": 0}
    assert cut["eval"]["prompts"] == 4 and cut["eval"]["input_cut"] > 0 and cut["eval"]["budget"] == 22


def test_a_prompt_budget_below_the_instruction_is_refused_at_start(tiny_model_dir, tmp_path):
    from cl_bench.run.runner import run

    # the tiny model has 512 positions: 508 new tokens leave prompts 4, far below any template
    cfg = compose(["general_eval=none", "progress=false", "evaluation.max_new_tokens=508"])
    with pytest.raises(ConfigError) as err:
        run(cfg, tmp_path)
    line = str(err.value)
    assert (
        "\n" not in line and "evaluation.max_new_tokens=508" in line and "valid: evaluation.max_new_tokens <=" in line
    )
    assert not (tmp_path / "stages").exists()

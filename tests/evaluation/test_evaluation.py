"""Generation is cut at the padded input length; scores do not depend on batch composition."""

import torch

from cl_bench.data.tasks.base import Example, TaskData
from cl_bench.evaluation.seen import evaluate_task, generate


class EchoModel(torch.nn.Module):
    """generate() returns the (left-padded) input followed by fixed continuation tokens."""

    def __init__(self, continuation):
        super().__init__()
        self.continuation = torch.tensor(continuation)
        self.training = False

    def generate(self, input_ids, attention_mask, **kw):
        cont = self.continuation.expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, cont], dim=1)


def test_continuation_cut_at_padded_length_with_mixed_prompt_lengths(tiny):
    _, tok = tiny
    answer = tok("sun moon", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    model = EchoModel(answer)
    exs = [
        Example("s", "Hi", ""),
        Example("m", "Repeat the list exactly.\nList: cat dog", ""),
        Example("l", "Which word comes last in the list?\nList: " + "cat dog sun " * 10, ""),
    ]
    preds = generate(model, tok, exs, max_new_tokens=8, max_prompt_len=512, device=torch.device("cpu"))
    # Cutting at each row's own (unpadded) length would leak prompt tails into the short rows.
    assert preds == ["sun moon"] * 3


def test_batched_equals_one_by_one_on_the_tiny_model(tiny):
    model, tok = tiny
    exs = [
        Example(str(i), p, "x")
        for i, p in enumerate(
            [
                "Hi",
                "Name a thing.",
                "Which word comes first in the list?\nList: cat dog sun moon",
                "What is 3 plus 4?",
                "Repeat the list exactly.\nList: " + "cat dog " * 12,
            ]
        )
    ]
    batched = generate(model, tok, exs, max_new_tokens=6, max_prompt_len=512, device=torch.device("cpu"))
    single = [
        generate(model, tok, [e], max_new_tokens=6, max_prompt_len=512, device=torch.device("cpu"))[0] for e in exs
    ]
    assert batched == single


def test_evaluate_task_scores_and_records(tiny):
    model, tok = tiny
    exs = [Example(f"e{i}", "Name a thing.", t) for i, t in enumerate(["cat", "dog", "xyz"])]
    task = TaskData(name="t", metric="exact_match", train=exs[:1], eval=exs)
    score, records = evaluate_task(
        model, tok, task, batch_size=2, max_new_tokens=4, max_prompt_len=64, device=torch.device("cpu"), progress=False
    )
    assert len(records) == 3 and {"prompt", "target", "prediction", "score"} <= set(records[0])
    assert score == 100.0 * sum(r["score"] for r in records) / 3
    assert records[2]["score"] == 0.0


def test_every_reference_counts_and_the_protocol_picks_the_metric(tiny):
    """An answer equal to the second reference is right under per_task (max over references);
    the SLICE authors' protocol scores the first reference only, as they did."""
    _, tok = tiny
    model = EchoModel(tok("sun moon", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    ex = Example("e", "Name two things.", "cat dog", references=("cat dog", "Sun moon."))
    task = TaskData(name="t", metric="ni_exact_match", train=[ex], eval=[ex])
    kw = dict(batch_size=1, max_new_tokens=4, max_prompt_len=64, device=torch.device("cpu"), progress=False)
    score, records = evaluate_task(model, tok, task, **kw)
    assert score == 100.0 and records[0]["references"] == ["cat dog", "Sun moon."]
    assert evaluate_task(model, tok, task, protocol="slice_paper", **kw)[0] == 0.0
    assert task.metric_for("slice_paper") == "slice_exact_match"


def test_plan_batches_by_count_or_by_a_token_budget():
    from cl_bench.evaluation.seen import plan_batches

    lengths = [5, 9, 2, 9, 3]
    # no budget: runs of batch_size prompts, longest first, ties by index (the former batching)
    assert plan_batches(lengths, batch_size=2) == [[1, 3], [0, 4], [2]]
    # a budget: the same order cut where padding + overhead is least, at most batch_size rows
    assert plan_batches(lengths, batch_size=5, max_batch_tokens=100, overhead_tokens=0) == [[1], [3], [0], [4], [2]]
    assert plan_batches(lengths, batch_size=5, max_batch_tokens=100, overhead_tokens=3) == [[1, 3], [0], [4, 2]]
    assert plan_batches(lengths, batch_size=5, max_batch_tokens=100, overhead_tokens=1000) == [[1, 3, 0, 4, 2]]
    assert plan_batches(lengths, batch_size=2, max_batch_tokens=100, overhead_tokens=1000) == [[1, 3], [0], [4, 2]]
    assert plan_batches(lengths, batch_size=5, max_batch_tokens=18, overhead_tokens=1000) == [[1, 3], [0, 4, 2]]


def test_a_token_budget_gives_the_one_by_one_predictions_with_less_padding(tiny):
    model, tok = tiny
    prompts = ["Hi", "Name a thing.", "What is 3 plus 4?", "Which word comes first in the list?\nList: cat dog sun"]
    prompts += ["Repeat the list exactly.\nList: " + "cat dog " * k for k in (3, 9, 14)]
    task = TaskData(
        "t", "exact_match", [Example("x", "p", "x")], [Example(str(i), p, "x") for i, p in enumerate(prompts)]
    )
    kw = dict(max_new_tokens=6, max_prompt_len=512, device=torch.device("cpu"), progress=False)
    single = evaluate_task(model, tok, task, batch_size=1, **kw)[1]
    count: dict = {}
    assert evaluate_task(model, tok, task, batch_size=8, stats=count, **kw)[1] == single
    for budget, step in ((64, 0), (160, 2), (10**6, 8)):
        stats: dict = {}
        records = evaluate_task(
            model, tok, task, batch_size=8, max_batch_tokens=budget, decode_step_tokens=step, stats=stats, **kw
        )[1]
        assert records == single
        assert stats["fed_prompt_tokens"] < count["fed_prompt_tokens"]  # the prefill feeds less padding
        assert stats["prompt_tokens"] == count["prompt_tokens"]

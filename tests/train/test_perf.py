"""The speed options that claim to be exact are exact, and the fast paths keep the
guarantees of the slow ones (NaN guard, end tokens, thread defaults). Speed itself is measured by
`make bench`, never here; so are whole-run identities (layout group vs pad, init cache off / miss /
hit: the bench's exactness phase), which would cost a minute of runs here."""

from __future__ import annotations

import copy
import itertools
import os

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model

from cl_bench.infra.errors import ConfigError, TrainingError
from cl_bench.stage import Regularizer
from cl_bench.train.layouts import Layout, collate_packed, pack_rows, plan_groups
from cl_bench.train.loss import causal_lm_loss, trained_tokens
from cl_bench.train.trainer import _forward_backward, train_stage
from helpers.small import TARGETS, random_examples, small_llama, stage_context

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


# ------------------------------------------------------------------ the layout planners
def _cost(groups, lengths, overhead):
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


def test_plan_groups_by_hand_and_against_every_cut():
    assert plan_groups([10, 2, 9, 3], max_tokens=100, overhead_tokens=5) == [[0, 2], [3, 1]]  # 20+5 + 6+5
    assert plan_groups([10, 2, 9, 3], max_tokens=100, overhead_tokens=50) == [[0, 2, 3, 1]]  # one pass: 40+50
    assert plan_groups([10, 2, 9, 3], max_tokens=100, overhead_tokens=0) == [[0], [2], [3], [1]]  # no padding at all
    assert plan_groups([30, 30], max_tokens=40, overhead_tokens=1000) == [[0], [1]]  # the cap wins over the overhead
    lengths = [7, 3, 12, 5, 5, 9, 1, 4]
    for cap, overhead in ((1000, 6), (24, 3), (40, 20)):
        plan = plan_groups(lengths, cap, overhead)
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        assert [i for g in plan for i in g] == order  # runs of the longest-first order
        assert all(len(g) * lengths[g[0]] <= cap or len(g) == 1 for g in plan)
        best = min(  # brute force over every cut of that order
            _cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths, overhead)
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
            if all(
                len(order[a:b]) * lengths[order[a]] <= cap or b - a == 1
                for a, b in zip((0, *cuts), (*cuts, len(order)))
            )
        )
        assert _cost(plan, lengths, overhead) == best


def test_plan_groups_caps_the_rows_of_a_group():
    lengths = [7, 3, 12, 5, 5, 9, 1, 4]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for max_rows, overhead in ((1, 5), (2, 40), (3, 1000)):
        plan = plan_groups(lengths, 10**6, overhead, max_rows=max_rows)
        assert [i for g in plan for i in g] == order and max(map(len, plan)) <= max_rows
        best = min(
            _cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths, overhead)
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
            if all(b - a <= max_rows for a, b in zip((0, *cuts), (*cuts, len(order))))
        )
        assert _cost(plan, lengths, overhead) == best
    assert plan_groups(lengths, 10**6, 0, max_rows=None) == plan_groups(lengths, 10**6, 0)


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 4, 3, 3, 1], row_len=8) == [[0, 2], [1, 3, 4]]
    assert pack_rows([9, 2], row_len=8) == [[0], [1]]  # too long for a row: a row of its own


# ------------------------------------------------------------------ exactness of the layouts
@pytest.mark.parametrize("layout", ["group", "pack"])
def test_a_layout_gives_the_padded_step_gradient(layout):
    model = small_llama()
    configured = [random_examples()[:6], random_examples()[6:]]
    grads, losses = {}, {}
    for name in ("pad", layout):
        micro = Layout(name, overhead_tokens=4).micro_batches(configured, 0, batch_size=6, max_len=24)
        model.zero_grad(set_to_none=True)
        n = sum(int(trained_tokens(b)) for b in micro)
        terms, finite = _forward_backward(
            model, micro, n, Regularizer(), stage_context(len(micro)), autocast=False, where="t"
        )
        assert bool(finite)
        grads[name] = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        losses[name] = float(terms["lm"])
        if name == layout:
            assert len(micro) != 2 or layout == "pack"  # group re-cut the two padded micro-batches
    assert losses[layout] == pytest.approx(losses["pad"], rel=1e-6)
    for k in grads["pad"]:
        torch.testing.assert_close(grads[layout][k], grads["pad"][k], rtol=1e-5, atol=1e-7)


def test_packed_rows_never_attend_across_examples():
    model = small_llama()
    exs = random_examples(3)
    packed = collate_packed([exs], pad_id=0)
    assert "attention_mask" not in packed
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits[0]
        at = 0
        for e in exs:  # each example's logits in the packed row = its logits alone
            alone = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[at : at + len(e.input_ids)], alone, rtol=1e-5, atol=1e-5)
            at += len(e.input_ids)
    starts = [0, len(exs[0].input_ids), len(exs[0].input_ids) + len(exs[1].input_ids)]
    assert all(int(packed["labels"][0, s]) == -100 for s in starts)  # no target predicted across a boundary


def test_loss_on_trained_positions_only_equals_hf_loss():
    model = small_llama()
    from cl_bench.data.prompts import collate_training

    batch = collate_training(random_examples(), pad_id=0)
    n = int(trained_tokens(batch))
    with torch.no_grad():
        ours = causal_lm_loss(model, batch, n)
        theirs = model(**batch, num_items_in_batch=n).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)


def test_pack_refuses_a_regularizer_with_loss_terms():
    from cl_bench.train.trainer import check_layout, layout_of

    class Terms(Regularizer):
        def loss(self, model, batch, ctx):
            return {}

    check_layout(layout_of(OmegaConf.create({"layout": "pack"})), Regularizer())  # no terms: fine
    with pytest.raises(ConfigError, match="trainer.layout=pack"):
        check_layout(layout_of(OmegaConf.create({"layout": "pack"})), Terms())
    with pytest.raises(ConfigError, match="trainer.layout='squash'"):
        layout_of(OmegaConf.create({"layout": "squash"}))


# ------------------------------------------------------------------ the NaN guard without per-step syncs
class NanAt(Regularizer):
    def __init__(self, step):
        self.step, self.calls = step, 0

    def loss(self, model, batch, ctx):
        self.calls += 1
        return {"poison": torch.tensor(float("nan") if self.calls >= self.step else 0.0)}


@pytest.fixture(scope="module")
def encoder_and_task(tiny):
    from cl_bench.data.prompts import TrainingEncoder
    from cl_bench.data.tasks import synthetic

    return TrainingEncoder(tiny[1], 64), synthetic.load_task("sentiment", root=None, n_train=16, n_eval=2, seed=0)


def _train(tiny, encoder_and_task, regularizer, steps, **trainer):
    """(adapter weights after train_stage, steps reported to on_step, the TrainingError or None)."""
    encoder, task = encoder_and_task
    torch.manual_seed(0)
    model = get_peft_model(
        copy.deepcopy(tiny[0]),
        LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False),
        adapter_name="stage_01",
    )
    cfg = OmegaConf.create(
        dict(
            lr=1e-2,
            weight_decay=0.0,
            warmup_ratio=0.0,
            epochs=1,
            batch_size=4,
            grad_accum=1,
            max_grad_norm=1.0,
            total_steps=steps,
            checkpoint_every_steps=0,
            **trainer,
        )
    )
    ctx = stage_context(1)
    ctx.current, ctx.tasks = task, [task]
    seen, error = [], None
    try:
        train_stage(model, ctx, encoder, cfg, regularizer, progress=False, on_step=lambda s, t: seen.append(s))
    except TrainingError as exc:
        error = exc
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, seen, error


@pytest.mark.parametrize("fused", [True, False], ids=["fused: read every 4 steps", "foreach: read every step"])
def test_a_non_finite_step_stops_the_stage_and_changes_nothing(tiny, encoder_and_task, fused):
    after_one, _, _ = _train(tiny, encoder_and_task, NanAt(99), 1, fused_adamw=fused)
    stopped, seen, error = _train(tiny, encoder_and_task, NanAt(2), 4, log_every_steps=4, fused_adamw=fused)
    assert error is not None and "non-finite loss at task 'sentiment' step 2 " in str(error) and "poison" in str(error)
    for n in after_one:  # the adapter as step 1 left it: the bad step and every later one were skipped
        assert torch.equal(stopped[n], after_one[n]), n
    assert seen == [1]  # the finite step before it is still reported


def test_terms_are_read_at_log_points_but_reported_for_every_step(tiny, encoder_and_task):
    _, seen, error = _train(tiny, encoder_and_task, Regularizer(), 5, log_every_steps=2)
    assert error is None and seen == [1, 2, 3, 4, 5]


def test_activation_checkpointing_gives_the_same_training(tiny, encoder_and_task):
    plain, _, _ = _train(tiny, encoder_and_task, Regularizer(), 2)
    ckpt, _, _ = _train(tiny, encoder_and_task, Regularizer(), 2, gradient_checkpointing=True)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ evaluation
def test_new_token_budget_and_end_tokens(tiny):
    from cl_bench.data.prompts import target_ids
    from cl_bench.data.tasks.base import Example
    from cl_bench.evaluation.seen import end_token_ids, new_token_budget

    model, tok = tiny
    exs = [Example("a", "p", "cat", references=("cat", "red cat dog")), Example("b", "p", "sun")]
    longest = len(target_ids(tok, "red cat dog"))
    assert new_token_budget(tok, exs, cap=64, margin=8) == longest + 8
    assert new_token_budget(tok, exs, cap=5, margin=8) == 5 and new_token_budget(tok, exs, cap=64, margin=None) == 64

    class Gen:
        generation_config = type("G", (), {"eos_token_id": [7, tok.eos_token_id, 9]})()

    assert end_token_ids(Gen(), tok) == [tok.eos_token_id, 7, 9]


def test_eval_halves_the_batch_on_out_of_memory(tiny):
    from cl_bench.data.tasks.base import Example, TaskData
    from cl_bench.evaluation.seen import evaluate_task

    model, tok = tiny

    class Flaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sizes = []
            self.training = False

        def generate(self, input_ids, attention_mask, **kw):
            self.sizes.append(input_ids.shape[0])
            if input_ids.shape[0] > 2:
                raise torch.OutOfMemoryError("fake")
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)

    exs = [Example(f"e{i}", f"Name a thing {i}.", "cat") for i in range(5)]
    task = TaskData("t", "exact_match", exs[:1], exs)
    kw = dict(max_new_tokens=4, max_prompt_len=64, device=torch.device("cpu"), progress=False)
    flaky, stats = Flaky(), {}
    score, records = evaluate_task(flaky, tok, task, batch_size=8, stats=stats, **kw)
    assert flaky.sizes == [5, 4, 2, 2, 1] and stats["batch_size"] == 2  # 8 -> 4 -> 2, then kept
    assert records == evaluate_task(model, tok, task, batch_size=1, **kw)[1]  # same predictions as one by one


# ------------------------------------------------------------------ threads
def test_default_threads_follow_affinity_and_slurm(monkeypatch):
    from cl_bench.infra.jobs import cpu_threads, usable_cpus

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("CL_BENCH_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert usable_cpus() == (4, "CPU affinity")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert usable_cpus() == (3, "SLURM_CPUS_PER_TASK")
    assert cpu_threads(None) == (3, "the CPUs this process may use (SLURM_CPUS_PER_TASK)")
    monkeypatch.setenv("CL_BENCH_THREADS", "1")
    assert cpu_threads(1) == (1, "CL_BENCH_THREADS=1")


# ------------------------------------------------------------------ capture: tokens per forward pass
def test_capture_max_tokens_only_changes_the_forward_passes():
    from cl_bench.data.prompts import collate_training
    from cl_bench.initializers.capture import capture_gradients
    from cl_bench.initializers.gradient import Slice
    from cl_bench.lora.layers import base_weight, lora_layers

    model = small_llama()
    weights = {n: base_weight(layer) for n, layer in lora_layers(model, "stage_01").items()}
    exs = random_examples()
    batches = [collate_training(exs[:6], pad_id=0), collate_training(exs[6:], pad_id=0)]
    whole = capture_gradients(model, weights, batches)
    small = capture_gradients(model, weights, batches, max_tokens=30)
    assert small.info["forward_passes"] > whole.info["forward_passes"]
    assert small.loss == pytest.approx(whole.loss, rel=1e-6)
    for n in whole.grads:
        torch.testing.assert_close(small.grads[n], whole.grads[n], rtol=1e-5, atol=1e-7)
    assert Slice(capture_max_tokens=512).capture_max_tokens == 512
    with pytest.raises(ConfigError, match="initializer.capture_max_tokens=0"):
        Slice(capture_max_tokens=0)

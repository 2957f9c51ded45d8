"""The method seams: exact gradient accumulation (training and capture), regularizer hooks,
plug-in state, stage history and task vectors, the one fold with its fp32 master, LR warmup."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from transformers import get_linear_schedule_with_warmup

from cl_bench.data.tasks.base import Example, TaskData
from cl_bench.infra.files import load_tensors
from cl_bench.initializers.base import InitResult
from cl_bench.initializers.capture import capture_gradients
from cl_bench.lora.layers import (
    WeightMaster,
    adapter_factors,
    add_adapter,
    apply_init,
    base_weight,
    lora_layers,
    lora_scaling,
    set_scaling,
)
from cl_bench.mergers.absorb import Absorb
from cl_bench.regularizers.base import token_mean_term
from cl_bench.run.store import (
    StageFiles,
    load_model_state,
    load_plugin_state,
    load_stage_record,
    save_model_state,
    save_plugin_state,
    save_stage_record,
)
from cl_bench.stage import History, Regularizer, StageContext, StageRecord
from cl_bench.train.trainer import build_optimizer, step_gradients, train_stage
from helpers.small import tiny_llama

TARGETS = ["q_proj", "v_proj"]
ADAPTER = "stage_01"


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def _llama(dtype=torch.float32, seed=0):
    return tiny_llama(seed=seed, dtype=dtype)


def _wrapped(dtype=torch.float32, seed=0, r=2):
    """A small Llama with a random (B ≠ 0) LoRA adapter on q/v."""
    model = _llama(dtype, seed)
    torch.manual_seed(seed + 1)
    config = LoraConfig(r=r, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False, use_rslora=True)
    return get_peft_model(model, config, adapter_name=ADAPTER)


def _task(name="t", n=8):
    ex = [Example(f"{name}-{i}", f"p{i}", f"a{i}") for i in range(n + 2)]
    return TaskData(name, "exact_match", ex[2:], ex[:2])


def _ctx(accum=1, **kw):
    kw = {"current": _task(), "previous": [], "make_batches": None, "adapter": ADAPTER, **kw}
    return StageContext(
        stage=1,
        rank=2,
        alpha=4.0,
        scaling=lora_scaling(4, 2, "rslora"),
        target_modules=TARGETS,
        device=torch.device("cpu"),
        seed=0,
        grad_accum=accum,
        **kw,
    )


# 16 examples of different prompt and answer lengths: the token count differs per micro-batch.
_GEN = torch.Generator().manual_seed(3)
_EXAMPLES = []
for _ in range(16):
    n_prompt, n_answer = int(torch.randint(3, 9, (1,), generator=_GEN)), int(torch.randint(1, 7, (1,), generator=_GEN))
    ids = torch.randint(1, 64, (n_prompt + n_answer,), generator=_GEN)
    _EXAMPLES.append((ids, n_prompt))


def _split(bs: int) -> list[dict[str, torch.Tensor]]:
    """The 16 examples as right-padded micro-batches of `bs` (each padded to its own width)."""
    out = []
    for start in range(0, 16, bs):
        group = _EXAMPLES[start : start + bs]
        width = max(len(ids) for ids, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        labels = torch.full((len(group), width), -100)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, (x, n_prompt) in enumerate(group):
            ids[row, : len(x)], mask[row, : len(x)] = x, 1
            labels[row, n_prompt : len(x)] = x[n_prompt:]
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _step_grads(model, bs, regularizer=None):
    model.zero_grad(set_to_none=True)
    batches = _split(bs)
    terms = step_gradients(model, batches, regularizer or Regularizer(), _ctx(accum=len(batches)))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads, terms


# ------------------------------------------------------------------ exact accumulation
class ParamAndTokenTerms(Regularizer):
    """A parameter penalty (once per step) and a per-token term normalised by token_mean_term."""

    def loss(self, model, batch, ctx):
        A = [p for n, p in model.named_parameters() if "lora_A" in n]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        trained = batch["labels"][:, 1:] != -100
        per_token = (logits[:, :-1, 0] * trained).sum()
        return {"l2": 0.1 * sum(a.pow(2).sum() for a in A), "tok": token_mean_term(per_token, batch, ctx)}


@pytest.mark.parametrize("regularizer", [None, ParamAndTokenTerms()], ids=["lm", "lm+terms"])
def test_accumulation_is_exact_for_any_split(regularizer):
    model = _wrapped()
    model.train()
    ref, ref_terms = _step_grads(model, 16, regularizer)
    assert ref_terms["lm"] > 0
    for bs in (8, 4):
        grads, terms = _step_grads(model, bs, regularizer)
        for n in ref:
            torch.testing.assert_close(grads[n], ref[n], rtol=0, atol=1e-6)
        for k in ref_terms:  # the logged values are the step's per-token mean / the penalty once
            assert terms[k] == pytest.approx(ref_terms[k], rel=1e-5)
    n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in _split(16))
    model.zero_grad()
    with torch.no_grad():  # "lm" is the per-token mean over the whole step (HF's mean loss on one batch)
        assert ref_terms["lm"] == pytest.approx(float(model(**_split(16)[0]).loss), rel=1e-6)
    assert n_tokens == sum(ids.numel() - p for ids, p in _EXAMPLES)  # every answer token is trained


def test_capture_is_exact_for_any_split():
    model = _wrapped()
    weights = {n: base_weight(layer) for n, layer in lora_layers(model, ADAPTER).items()}
    ref = capture_gradients(model, weights, _split(16))
    assert ref.steps == 1
    for bs in (8, 4):
        cap = capture_gradients(model, weights, _split(bs))
        for n in ref.grads:
            torch.testing.assert_close(cap.grads[n], ref.grads[n], rtol=0, atol=1e-6)
        assert cap.loss == pytest.approx(ref.loss, rel=1e-6)


def test_peft_lora_ga_gradient_is_exact_for_any_split():
    from cl_bench.initializers.peft_native import LoraGAPeft

    grads = {}
    for bs in (16, 4):
        model = _llama()
        init = LoraGAPeft(capture_steps=16 // bs, capture_batch_size=bs)
        ctx = _ctx(make_batches=lambda t, n, b, s: iter(_split(b)))
        config = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, **init.lora_config_kwargs())
        init.before_wrap(model, config, ctx)
        grads[bs] = {
            n: m._peft_loraga_grad.clone() for n, m in model.named_modules() if hasattr(m, "_peft_loraga_grad")
        }
    assert len(grads[16]) == 2
    for n in grads[16]:
        torch.testing.assert_close(grads[4][n], grads[16][n], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ regularizer hooks in the loop
class ZeroGrad(Regularizer):
    """Zeroes every gradient after backward: if that is before the optimizer step, nothing moves."""

    def __init__(self, zero=True):
        self.zero, self.calls, self.saw_grad = zero, 0, []

    def after_backward(self, model, ctx):
        self.calls += 1
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        self.saw_grad.append(all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads))
        if self.zero:
            for g in grads:
                g.zero_()


class Replay(Regularizer):
    """Mixes two training examples of an earlier task into every micro-batch."""

    def __init__(self, bad=None):
        self.sizes, self.bad = [], bad

    def extra_examples(self, ctx, step, micro):
        return self.bad or [
            (ctx.previous[0], (2 * (step * ctx.grad_accum + micro) + k) % len(ctx.previous[0].train)) for k in (0, 1)
        ]

    def loss(self, model, batch, ctx):
        self.sizes.append(batch["input_ids"].shape[0])
        return {}


@pytest.fixture(scope="module")
def encoder_and_tasks(tiny):
    from cl_bench.data.prompts import TrainingEncoder
    from cl_bench.data.tasks import synthetic

    tasks = [synthetic.load_task(n, root=None, n_train=8, n_eval=2, seed=0) for n in ("sentiment", "parity")]
    return TrainingEncoder(tiny[1], 64), tasks


def _train(tiny, encoder_and_tasks, regularizer, **trainer):
    encoder, (prev, cur) = encoder_and_tasks
    model = get_peft_model(
        copy.deepcopy(tiny[0]),
        LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False),
        adapter_name=ADAPTER,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = OmegaConf.create(
        dict(
            lr=1e-2,
            weight_decay=0.0,
            warmup_ratio=0.0,
            epochs=1,
            batch_size=2,
            grad_accum=2,
            max_grad_norm=1.0,
            total_steps=2,
            checkpoint_every_steps=0,
        )
        | trainer
    )
    ctx = _ctx(accum=2, current=cur, previous=[prev], tasks=[prev, cur])
    train_stage(model, ctx, encoder, cfg, regularizer, progress=False)
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if p.requires_grad)
    return moved


def test_after_backward_runs_between_backward_and_the_optimizer_step(tiny, encoder_and_tasks):
    control = ZeroGrad(zero=False)
    assert _train(tiny, encoder_and_tasks, control) > 1e-4  # without zeroing the adapter moves
    zero = ZeroGrad()
    assert _train(tiny, encoder_and_tasks, zero) == 0.0  # zeroed before the step: nothing moves
    assert zero.calls == 2 and all(zero.saw_grad)  # once per step, after the backward


def test_extra_examples_join_every_micro_batch_and_must_be_training_examples(tiny, encoder_and_tasks):
    replay = Replay()
    _train(tiny, encoder_and_tasks, replay, layout="pad")
    assert replay.sizes == [4, 4, 4, 4]  # 2 of the task + 2 replayed, 2 steps × 2 micro-batches
    grouped = Replay()  # layout=group re-cuts each step's 8 examples by length: same rows per step
    _train(tiny, encoder_and_tasks, grouped, layout="group")
    per_step, total = [], 0
    for n in grouped.sizes:
        total += n
        if total in (8, 16):
            per_step.append(total)
    assert sum(grouped.sizes) == 16 and per_step == [8, 16]
    _, (prev, _) = encoder_and_tasks
    with pytest.raises(ValueError, match="not a training example"):
        _train(tiny, encoder_and_tasks, Replay(bad=[(prev, len(prev.train))]))  # past the train split
    other = TaskData("foreign", "exact_match", prev.train, prev.eval)
    with pytest.raises(ValueError, match="not a training example"):
        _train(tiny, encoder_and_tasks, Replay(bad=[(other, 0)]))  # not a task of the run


# ------------------------------------------------------------------ plug-in state, history, τ
def test_plugin_state_round_trips_tensors_and_json(tmp_path):
    state = {"fisher": torch.arange(6.0).reshape(2, 3), "count": 3, "tasks": ["a", "b"], "cfg": {"k": [1, 2.5, None]}}
    save_plugin_state(tmp_path / "regularizer.safetensors", state)
    back = load_plugin_state(tmp_path / "regularizer.safetensors")
    assert torch.equal(back.pop("fisher"), state.pop("fisher")) and back == state
    with pytest.raises(TypeError, match="JSON"):
        save_plugin_state(tmp_path / "bad.safetensors", {"x": object()})


def test_task_vector_is_the_trained_delta_net_of_the_absorbed_init(tmp_path):
    A, B = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [-1.0]])  # r = 1, d_in = d_out = 2
    A0, B0 = torch.tensor([[0.5, 0.0]]), torch.tensor([[2.0], [0.0]])
    record = StageRecord(1, "t", ADAPTER, lambda: ({"m": (A, B)}, {"m": (A0, B0)}, {"m": 2.0}))
    # 2·[[1, 2], [-1, -2]] − 2·[[1, 0], [0, 0]]
    assert torch.equal(record.task_vector("m"), torch.tensor([[0.0, 4.0], [-2.0, -4.0]]))
    files = StageFiles(tmp_path, 1)
    save_stage_record(files, 1, "t", ADAPTER, {"m": (A, B)}, {"m": (A0, B0)}, {"m": 2.0})
    loaded = load_stage_record(files)
    assert (loaded.stage, loaded.task, loaded.adapter) == (1, "t", ADAPTER)
    assert torch.equal(loaded.task_vector("m"), record.task_vector("m"))
    save_stage_record(files, 1, "t", ADAPTER, {"m": (A, B)}, None, {"m": 2.0})  # nothing absorbed
    assert torch.equal(load_stage_record(files).task_vector("m"), 2.0 * B @ A)
    history = History([loaded])
    with pytest.raises(ValueError):
        history.append(record)  # stage 1 again


# ------------------------------------------------------------------ the fold, bf16 master
def _absorb_stage(model, master, update_scale, seed):
    """Stage 2 of the test: a fresh adapter with s·B·A ≈ update_scale·|W|, absorbed."""
    torch.manual_seed(seed)
    peft = add_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, use_rslora=True), "stage_02")
    set_scaling(peft, "stage_02", "rslora")
    for layer in lora_layers(peft, "stage_02").values():
        with torch.no_grad():
            layer.lora_B["stage_02"].weight.normal_(0, update_scale)
            layer.lora_A["stage_02"].weight.normal_(0, 1 / 4)
    factors = adapter_factors(peft, "stage_02")
    ctx = _ctx(adapter="stage_02", master=master)
    return Absorb().consolidate(peft, ctx).train, factors


def test_bf16_absorption_keeps_every_update_in_the_fp32_master(tmp_path):
    model = _llama(torch.bfloat16)
    master = WeightMaster.attach(model, TARGETS)
    w1 = {n: base_weight_of(model, n).float().clone() for n in master.tensors}
    assert set(w1) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    plain, factors = _absorb_stage(model, master, 2e-3, seed=5)
    s = lora_scaling(4, 2, "rslora")
    for n, (A, B) in factors.items():
        expected = w1[n] + s * B @ A
        torch.testing.assert_close(master.tensors[n], expected, rtol=0, atol=1e-6)
        assert torch.equal(base_weight_of(plain, n), expected.to(torch.bfloat16))  # one cast for compute
    # the master is what is saved: a fresh model resumed from it holds the same master and weights
    save_model_state(StageFiles(tmp_path, 2), plain, TARGETS, master)
    assert all(t.dtype == torch.float32 for t in load_tensors(StageFiles(tmp_path, 2).model_state).values())
    fresh = _llama(torch.bfloat16)
    fresh_master = WeightMaster.attach(fresh, TARGETS)
    load_model_state(StageFiles(tmp_path, 2), fresh, TARGETS, fresh_master)
    for n in master.tensors:
        assert torch.equal(fresh_master.tensors[n], master.tensors[n])
        assert torch.equal(base_weight_of(fresh, n), base_weight_of(plain, n))


def test_bf16_init_absorption_goes_through_the_master():
    model = _llama(torch.bfloat16)
    master = WeightMaster.attach(model, TARGETS)
    w = {n: t.clone() for n, t in master.tensors.items()}
    peft = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, use_rslora=True), adapter_name=ADAPTER
    )
    s = set_scaling(peft, ADAPTER, "rslora")
    torch.manual_seed(9)
    factors = {n: (torch.randn(2, 16) * 1e-2, torch.randn(16, 2) * 1e-2) for n in w}
    summary = apply_init(peft, InitResult(factors=factors, absorb=True), ADAPTER, master)
    assert summary["absorbed"] and summary["modules"] == 2
    for n, (A, B) in factors.items():
        torch.testing.assert_close(master.tensors[n], w[n] - s[n] * B @ A, rtol=0, atol=1e-6)


def test_bf16_peft_absorbed_init_brings_the_master_along():
    from cl_bench.lora.layers import follow_peft_absorption_

    model = _llama(torch.bfloat16)
    master = WeightMaster.attach(model, TARGETS)
    w = {n: t.clone() for n, t in master.tensors.items()}
    config = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, use_rslora=True, init_lora_weights="pissa")
    peft = get_peft_model(model, config, adapter_name=ADAPTER)  # PEFT: W ← bf16(W − s·B0·A0)
    s = set_scaling(peft, ADAPTER, "rslora")
    follow_peft_absorption_(peft, ADAPTER, master)
    for n, (A0, B0) in adapter_factors(peft, ADAPTER).items():
        torch.testing.assert_close(master.tensors[n], w[n] - s[n] * B0 @ A0, rtol=0, atol=1e-6)
        assert torch.equal(base_weight_of(peft, n), master.tensors[n].to(torch.bfloat16))


def test_fold_without_master_is_the_old_fp32_arithmetic():
    """float32 models get no master (no memory) and fold exactly as W + Δ."""
    model = _llama()
    master = WeightMaster.attach(model, TARGETS)
    assert master.tensors == {}
    w = {n: base_weight_of(model, n).clone() for n in ("model.layers.0.self_attn.q_proj",)}
    plain, factors = _absorb_stage(model, master, 1e-2, seed=2)
    n = "model.layers.0.self_attn.q_proj"
    A, B = factors[n]
    assert torch.equal(base_weight_of(plain, n), w[n] + lora_scaling(4, 2, "rslora") * (B @ A))


def base_weight_of(model, name):
    from cl_bench.lora.layers import target_linears

    return target_linears(model, TARGETS)[name].weight.detach()


# ------------------------------------------------------------------ LR warm-up
@pytest.mark.parametrize("total,ratio", [(10, 0.3), (6, 0.03), (1, 0.03), (33, 0.1), (8, 0.0)])
def test_lr_schedule_warms_up_so_that_every_step_trains(total, ratio):
    """HF's warm-up count ceil(ratio·T) and its linear decay, but warm-up step k runs at
    lr·(k+1)/(w+1) instead of lr·k/w: no step (not even a stage's only one) runs at lr 0."""
    model = torch.nn.Linear(2, 2)
    cfg = OmegaConf.create(dict(lr=1.0, weight_decay=0.0, warmup_ratio=ratio, total_steps=total))
    opt, sched = build_optimizer(model, cfg)
    ours = []
    for _ in range(total):
        ours.append(opt.param_groups[0]["lr"])  # the lr this step uses
        opt.step()
        sched.step()
    ref_opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    warmup = math.ceil(ratio * total)
    ref = get_linear_schedule_with_warmup(ref_opt, warmup, total)  # HF Trainer's warmup steps
    theirs = []
    for _ in range(total):
        theirs.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert min(ours) > 0
    assert ours[warmup:] == pytest.approx(theirs[warmup:], abs=1e-12)  # the decay is HF's
    assert ours[:warmup] == pytest.approx([(k + 1) / (warmup + 1) for k in range(warmup)])
    if (total, ratio) == (10, 0.3):  # by hand: 3 warm-up steps, then linear to 1/7 at the last step
        assert ours == pytest.approx([1 / 4, 2 / 4, 3 / 4, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7])


def test_a_one_step_stage_trains_and_warns_that_it_is_all_warm_up(tiny, encoder_and_tasks, caplog):
    with caplog.at_level("WARNING", logger="cl_bench"):
        moved = _train(tiny, encoder_and_tasks, Regularizer(), total_steps=1, warmup_ratio=0.03)
    assert moved > 1e-4  # with HF's schedule the only step ran at lr 0: every B stayed 0
    assert any("all 1 steps are warm-up" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ a merge that keeps the model wrapped
@pytest.mark.slow
def test_a_merge_may_keep_the_model_wrapped_with_one_adapter_per_stage(tiny_model_dir, tmp_path):
    """GainLoRA's shape: tests/seam_plugins.KeepBranches keeps stage 1's adapter (frozen) beside
    stage 2's, folds nothing, and evaluates the wrapped model."""
    from transformers import AutoModelForCausalLM

    from cl_bench.run.runner import run
    from helpers import FAST, compose

    cfg = compose(
        FAST
        + [
            "sequence=synthetic_conflict",
            "sequence.tasks=[sentiment,parity]",
            "trainer.max_steps=3",
            "merge._target_=helpers.seam_plugins.KeepBranches",
        ]
    )
    results = run(cfg, tmp_path)
    assert results["complete"] and all(v is not None for row in results["matrix"] for v in row)
    records = [load_stage_record(StageFiles(tmp_path, s)) for s in (1, 2)]
    assert [r.adapter for r in records] == ["stage_01", "stage_02"]
    assert all(float(r.task_vector(r.modules[0]).abs().max()) > 0 for r in records)
    # nothing was folded: the saved target weights of the (wrapped) train model are the pretrained ones
    saved = load_tensors(StageFiles(tmp_path, 2).model_state)
    pretrained = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    assert saved and all(torch.equal(t, pretrained[k]) for k, t in saved.items())
    # a crash during stage 2's evaluation: the resumed run rebuilds the branches (merge.restore
    # from the history) and scores the same row
    partial = json.loads((tmp_path / "results.json").read_text())
    partial.update(complete=False, stages=partial["stages"][:1])
    partial["matrix"][2] = [None, None]
    (tmp_path / "results.json").write_text(json.dumps(partial))
    again = run(cfg, tmp_path)
    assert again["matrix"] == json.loads(json.dumps(results["matrix"]))

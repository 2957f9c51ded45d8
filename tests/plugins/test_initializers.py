"""Initializers on a small random Llama: capture, wiring of ψ/SVD/β, absorption, cache, errors.

The absorption tolerance: fp32 model, max |Δlogit| ≤ 1e-5 between the model before the
adapter was attached and the PEFT model right after init + absorption (observed ~3e-7).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from cl_bench.data.tasks.base import Example, TaskData
from cl_bench.infra.errors import ConfigError
from cl_bench.initializers import gradient
from cl_bench.initializers.cache import TensorCache, content_key, model_state_fingerprint
from cl_bench.initializers.capture import capture_gradients
from cl_bench.initializers.gradient import LoraGA, Slice
from cl_bench.initializers.loram import LoRAM
from cl_bench.initializers.milora import MiLoRA
from cl_bench.initializers.peft_native import EVA, CorDA, LoraGAPeft, OLoRA, PiSSA
from cl_bench.initializers.vanilla import Vanilla
from cl_bench.lora import linalg
from cl_bench.lora.layers import WeightMaster, apply_init, as_out_in, base_weight, set_scaling
from cl_bench.lora.layers import lora_layers as _lora_layers
from cl_bench.stage import StageContext

REPO = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 4
ABSORB_TOL = 1e-5
SMALL = {"capture_steps": 2, "capture_batch_size": 4}
ADAPTER = "default"  # PEFT's name when get_peft_model is given none (the runner names one per stage)


def lora_layers(peft_model):
    return _lora_layers(peft_model, ADAPTER)


def _task(name: str) -> TaskData:
    examples = [Example(f"{name}-{i}", f"prompt {i}", f"target {i}") for i in range(8)]
    return TaskData(name, "exact_match", examples[2:], examples[:2])


def make_batches(task: TaskData, n_batches: int, batch_size: int, seed: int):
    """Seeded token batches per task (prompt half masked), like TrainingEncoder.batches."""
    gen = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(task.name.encode()))
    for _ in range(n_batches):
        ids = torch.randint(0, 256, (batch_size, 12), generator=gen)
        labels = ids.clone()
        labels[:, :6] = -100
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """These matrices are tiny: multithreaded LAPACK only adds synchronisation (10-1000x slower
    QR on a busy 2-core machine), so the module runs single-threaded and restores the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return LlamaForCausalLM(cfg).eval()


def _ctx(stage=1, previous=(), cache_dir=None, logs=None, current="cur", seed=1):
    return StageContext(
        stage=stage,
        current=_task(current),
        previous=[_task(p) for p in previous],
        rank=RANK,
        alpha=8.0,
        scaling=4.0,
        target_modules=TARGETS,
        device=torch.device("cpu"),
        seed=seed,
        make_batches=make_batches,
        cache_dir=cache_dir,
        log=(logs.append if logs is not None else (lambda s: None)),
    )


def _run_protocol(init, model, ctx, rslora=True):
    """The runner's order: config kwargs, before_wrap, wrap, init, set_scaling, apply_init."""
    lora_config = LoraConfig(
        r=RANK, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, use_rslora=rslora, **init.lora_config_kwargs()
    )
    master = WeightMaster.attach(model, TARGETS)
    init.before_wrap(model, lora_config, ctx)
    peft_model = get_peft_model(model, lora_config)
    result = init.init(peft_model, ctx)
    set_scaling(peft_model, ADAPTER, "rslora" if rslora else "standard")
    summary = apply_init(peft_model, result, ADAPTER, master)
    return peft_model, result, summary


_IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(5))

ALL_INITIALIZERS = [
    ("vanilla", lambda: Vanilla(), ()),
    ("lora_ga", lambda: LoraGA(**SMALL), ()),
    ("slice_stage1", lambda: Slice(**SMALL), ()),
    ("slice_stage2", lambda: Slice(threshold=0.99, **SMALL), ("prev_a", "prev_b")),
    ("slice_magnitude", lambda: Slice(operator="magnitude_preserving", threshold=0.99, **SMALL), ("prev_a",)),
    ("slice_gradvac", lambda: Slice(operator="gradvac", scope="per_module", threshold=0.5, **SMALL), ("prev_a",)),
    (
        "slice_nullspace",
        lambda: Slice(operator="nullspace", scope="per_module", nullspace_rank=2, **SMALL),
        ("prev_a",),
    ),
    ("loram", lambda: LoRAM(), ()),
    ("milora", lambda: MiLoRA(), ()),
    ("lora_ga_peft", lambda: LoraGAPeft(**SMALL), ()),
    ("pissa", lambda: PiSSA(), ()),
    ("pissa_niter", lambda: PiSSA(niter=2), ()),
    ("olora", lambda: OLoRA(), ()),
    ("eva", lambda: EVA(tau=0.9, use_label_mask=False, steps=2, batch_size=8), ()),
    ("corda_ipm", lambda: CorDA(samples=8), ()),
    ("corda_kpm_prev", lambda: CorDA(method="kpm", calibration="previous", samples=8), ("prev_a",)),
]


@pytest.mark.parametrize("label,factory,previous", ALL_INITIALIZERS, ids=[x[0] for x in ALL_INITIALIZERS])
def test_absorption_preserves_the_function_for_every_initializer(base_model, label, factory, previous):
    model = copy.deepcopy(base_model)
    with torch.no_grad():
        before = model(input_ids=_IDS).logits
    peft_model, result, summary = _run_protocol(factory(), model, _ctx(stage=len(previous) + 1, previous=previous))
    peft_model.eval()
    with torch.no_grad():
        after = peft_model(input_ids=_IDS).logits
    assert float((after - before).abs().max()) <= ABSORB_TOL
    assert result.stats["method"] in label
    json.dumps(result.stats)  # results.json must be able to hold it
    if label != "vanilla":
        assert result.stats["seconds"]["total"] >= 0 and "process_peak_rss_mb" in result.stats["peak_memory_mb"]
    if label not in ("vanilla", "eva"):  # these start with B = 0: the adapter must be non-trivial otherwise
        nonzero = [float(l.lora_B[ADAPTER].weight.detach().abs().max()) > 0 for l in lora_layers(peft_model).values()]
        assert all(nonzero)


@pytest.mark.parametrize("factory", [lambda: LoraGA(**SMALL), lambda: LoRAM(), lambda: MiLoRA()])
def test_absorption_uses_the_adapters_actual_scaling(base_model, factory):
    """Standard α/r scaling (not rsLoRA) is honoured too: absorption reads the module's scaling."""
    model = copy.deepcopy(base_model)
    with torch.no_grad():
        before = model(input_ids=_IDS).logits
    peft_model, _, summary = _run_protocol(factory(), model, _ctx(), rslora=False)
    assert next(iter(lora_layers(peft_model).values())).scaling[ADAPTER] == pytest.approx(8 / RANK)
    with torch.no_grad():
        after = peft_model.eval()(input_ids=_IDS).logits
    assert float((after - before).abs().max()) <= ABSORB_TOL
    assert summary["absorbed"] and summary["delta_fro"] > 0


# --------------------------------------------------------------------------- capture
def test_capture_equals_the_mean_full_backward_gradient(base_model):
    model = copy.deepcopy(base_model)
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=8, target_modules=TARGETS))
    layers = lora_layers(peft_model)
    weights = {n: base_weight(l) for n, l in layers.items()}
    batches = list(make_batches(_task("cur"), 3, 4, seed=0))
    flags_before = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    peft_model.train()
    cap = capture_gradients(peft_model, weights, batches)
    # flags, mode and .grad are restored: nothing of the capture stays on the model
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == flags_before
    assert peft_model.training
    assert all(p.grad is None for p in peft_model.parameters())
    # reference: plain model, every parameter requiring grad, summed over batches
    ref_model = copy.deepcopy(base_model).eval()
    ref_model.requires_grad_(True)
    for b in batches:
        ref_model(**b).loss.backward()
    ref = dict(ref_model.named_parameters())
    for name, g in cap.grads.items():
        ref_name = name.replace("base_model.model.", "", 1) + ".weight"
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, ref[ref_name].grad / 3, rtol=1e-4, atol=1e-6)
    assert cap.steps == 3
    off = capture_gradients(peft_model, weights, batches, offload=True)
    for name in cap.grads:
        assert off.grads[name].device.type == "cpu"
        torch.testing.assert_close(off.grads[name], cap.grads[name])


def test_capture_only_computes_gradients_for_target_weights(base_model):
    model = copy.deepcopy(base_model)
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=8, target_modules=TARGETS))
    weights = {n: base_weight(l) for n, l in lora_layers(peft_model).items()}
    enabled: list[set[str]] = []
    hook = model.register_forward_pre_hook(
        lambda mod, args: enabled.append({n for n, p in peft_model.named_parameters() if p.requires_grad})
    )
    capture_gradients(peft_model, weights, list(make_batches(_task("cur"), 2, 2, seed=0)))
    hook.remove()
    assert len(enabled) == 2
    for names in enabled:  # during the forward passes, only the target base weights require grad
        assert len(names) == len(weights) and all(n.endswith("base_layer.weight") for n in names)


# --------------------------------------------------------------------------- wiring of SLICE
def _factors(init, model, ctx):
    lora_config = LoraConfig(r=RANK, lora_alpha=8, target_modules=TARGETS, use_rslora=True)
    peft_model = get_peft_model(copy.deepcopy(model), lora_config)
    return init.init(peft_model, ctx), peft_model


def test_slice_at_stage_one_is_lora_ga_and_says_so(base_model):
    ga, _ = _factors(LoraGA(**SMALL), base_model, _ctx())
    sl, _ = _factors(Slice(c=0.5, **SMALL), base_model, _ctx())
    assert sl.stats["projection"] == "skipped: no previous task"
    for name, (A, B) in ga.factors.items():
        assert torch.equal(sl.factors[name][0], A) and torch.equal(sl.factors[name][1], B)


def test_slice_with_c_zero_is_lora_ga_at_later_stages(base_model):
    ga, _ = _factors(LoraGA(**SMALL), base_model, _ctx(stage=2, previous=("prev_a",)))
    sl, _ = _factors(Slice(c=0.0, threshold=0.99, **SMALL), base_model, _ctx(stage=2, previous=("prev_a",)))
    assert sl.stats["fired"] and not sl.stats["changed"] and "no change" in sl.stats["projection"]
    for name, (A, B) in ga.factors.items():
        assert torch.equal(sl.factors[name][0], A) and torch.equal(sl.factors[name][1], B)


def test_slice_factors_are_the_svd_of_the_projected_equal_weight_gradient(base_model):
    """Recompute SLICE by hand from the captures: G_prev = mean of per-task means, ψ global, Eq. 7, Eq. 9."""
    ctx = _ctx(stage=3, previous=("prev_a", "prev_b"))
    init = Slice(c=0.7, threshold=0.99, prev_capture_steps=3, prev_capture_batch_size=2, **SMALL)
    result, peft_model = _factors(init, base_model, ctx)
    layers = lora_layers(peft_model)
    weights = {n: base_weight(l) for n, l in layers.items()}
    g = capture_gradients(peft_model, weights, make_batches(ctx.current, 2, 4, ctx.seed)).grads
    h_a = capture_gradients(peft_model, weights, make_batches(ctx.previous[0], 3, 2, ctx.seed)).grads
    h_b = capture_gradients(peft_model, weights, make_batches(ctx.previous[1], 3, 2, ctx.seed)).grads
    h = {n: (h_a[n] + h_b[n]) / 2 for n in g}
    projected, stats = linalg.project_gradients(g, h, c=0.7, scope="global", threshold=0.99)
    assert stats["fired"] and result.stats["fired"]
    assert result.stats["cos_global"] == pytest.approx(stats["cos_global"], rel=1e-6)
    assert result.stats["gamma"] == pytest.approx(stats["gamma"], rel=1e-6)
    for name, layer in layers.items():
        A, B, _ = linalg.lora_ga_selection(projected[name], RANK, seed=linalg.module_seed(ctx.seed, name))
        A, B, _ = linalg.rescale_factors(as_out_in(layer, weights[name]), A, B)
        torch.testing.assert_close(result.factors[name][0], A, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result.factors[name][1], B, rtol=1e-4, atol=1e-5)
    for key in (
        "projection",
        "fired",
        "cos_global",
        "gamma",
        "per_module",
        "sv_mass_top_r",
        "seconds",
        "peak_memory_mb",
    ):
        assert key in result.stats
    assert 0.0 < result.stats["sv_mass_top_r"] <= result.stats["sv_mass_top_2r"] <= 1.0 + 1e-9
    assert [p["task"] for p in result.stats["capture"]["previous"]] == ["prev_a", "prev_b"]


def test_projection_not_fired_is_recorded(base_model):
    res, _ = _factors(Slice(threshold=-1.0, **SMALL), base_model, _ctx(stage=2, previous=("prev_a",)))
    assert res.stats["fired"] is False and res.stats["projection"].startswith("not fired")
    assert isinstance(res.stats["cos_global"], float)


# --------------------------------------------------------------------------- cache
class _CountingCapture:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = gradient.capture_gradients

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(gradient, "capture_gradients", counted)


def test_c_sweep_shares_captures_and_stage1_inits(base_model, tmp_path, monkeypatch):
    counter = _CountingCapture(monkeypatch)
    logs: list[str] = []
    first, _ = _factors(Slice(c=1.0, **SMALL), base_model, _ctx(cache_dir=str(tmp_path), logs=logs))
    assert counter.calls == 1 and first.stats["capture"]["current"]["cache"] == "miss"
    for c in (0.5, 0.0):  # stage 1: nothing recomputed at all (the init itself is shared)
        again, _ = _factors(Slice(c=c, **SMALL), base_model, _ctx(cache_dir=str(tmp_path), logs=logs))
        assert again.stats["cache"]["init"] == "hit" and again.stats["projection"] == "skipped: no previous task"
        for n, (A, B) in first.factors.items():
            assert torch.equal(again.factors[n][0], A) and torch.equal(again.factors[n][1], B)
    assert counter.calls == 1
    assert any("cache hit" in line for line in logs)
    # stage 2, same model state: captures are reused across c, the init is recomputed per c
    ctx2 = lambda: _ctx(stage=2, previous=("prev_a",), cache_dir=str(tmp_path), logs=logs)  # noqa: E731
    a, _ = _factors(Slice(c=1.0, threshold=0.99, **SMALL), base_model, ctx2())
    calls = counter.calls
    b, _ = _factors(Slice(c=0.5, threshold=0.99, **SMALL), base_model, ctx2())
    assert counter.calls == calls  # both captures came from the cache
    assert b.stats["capture"]["current"]["cache"] == "hit" and b.stats["capture"]["previous"][0]["cache"] == "hit"
    assert b.stats["cache"]["init"] == "miss"
    name = next(iter(a.factors))
    assert not torch.equal(a.factors[name][1], b.factors[name][1])
    # rank / seed are not part of the capture key either: a LoRA-GA at stage 1 reuses it
    lga, _ = _factors(LoraGA(svd="exact", **SMALL), base_model, _ctx(cache_dir=str(tmp_path)))
    assert lga.stats["capture"]["current"]["cache"] == "hit"


def test_cache_key_follows_model_state_and_data(base_model, tmp_path, monkeypatch):
    counter = _CountingCapture(monkeypatch)
    _factors(LoraGA(**SMALL), base_model, _ctx(cache_dir=str(tmp_path)))
    changed = copy.deepcopy(base_model)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    res, _ = _factors(LoraGA(**SMALL), changed, _ctx(cache_dir=str(tmp_path)))
    assert res.stats["capture"]["current"]["cache"] == "miss" and counter.calls == 2
    res, _ = _factors(LoraGA(**SMALL), base_model, _ctx(cache_dir=str(tmp_path), current="other"))
    assert res.stats["capture"]["current"]["cache"] == "miss" and counter.calls == 3
    res, _ = _factors(LoraGA(capture_steps=3, capture_batch_size=4), base_model, _ctx(cache_dir=str(tmp_path)))
    assert res.stats["capture"]["current"]["cache"] == "miss" and counter.calls == 4
    # off switch
    res, _ = _factors(LoraGA(**SMALL), base_model, _ctx(cache_dir=None))
    assert res.stats["cache"]["init"] == "off" and res.stats["capture"]["current"]["cache"] == "off"


def test_cache_files_are_safetensors_and_roundtrip(tmp_path):
    cache = TensorCache(tmp_path, log=lambda s: None)
    key = content_key("capture", "x")
    tensors = {"a.b": torch.arange(6.0).reshape(2, 3)}
    path = cache.save("capture", key, tensors, {"loss": 1.5})
    assert path.suffix == ".safetensors" and path.read_bytes()[8:9] == b"{"  # safetensors JSON header
    loaded, meta = cache.load("capture", key)
    assert torch.equal(loaded["a.b"], tensors["a.b"]) and meta == {"loss": 1.5}
    assert TensorCache(None).load("capture", key) is None
    path.write_bytes(b"garbage")
    assert cache.load("capture", key) is None  # a corrupt entry is recomputed, not trusted


def test_model_fingerprint_ignores_a_noop_adapter_only(base_model):
    plain = model_state_fingerprint(
        get_peft_model(copy.deepcopy(base_model), LoraConfig(r=2, target_modules=["q_proj"]))
    )
    torch.manual_seed(99)  # another random A
    other_a = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=2, target_modules=["q_proj"]))
    assert model_state_fingerprint(other_a) == plain
    with torch.no_grad():
        next(iter(lora_layers(other_a).values())).lora_B[ADAPTER].weight.fill_(0.1)
    assert model_state_fingerprint(other_a) != plain


# --------------------------------------------------------------------------- config errors
def test_invalid_knobs_raise_config_error():
    with pytest.raises(ConfigError, match=r"initializer\.c=1\.5"):
        Slice(c=1.5)
    with pytest.raises(ConfigError, match="no global form"):
        Slice(operator="gradvac", scope="global")
    with pytest.raises(ConfigError, match="no global form"):
        Slice(operator="nullspace", scope="global", nullspace_rank=2)
    with pytest.raises(ConfigError, match="operator"):
        Slice(operator="cagrad")
    with pytest.raises(ConfigError, match="capture_steps"):
        LoraGA(capture_steps=0)
    with pytest.raises(ConfigError, match="svd"):
        LoraGA(svd="full")
    with pytest.raises(ConfigError, match="method"):
        CorDA(method="xyz")
    with pytest.raises(ConfigError, match="rho"):
        EVA(rho=0.5)


def test_rank_validation_names_the_module():
    shapes = {"layers.0.k_proj": (16, 64), "layers.0.q_proj": (64, 64)}
    with pytest.raises(ConfigError, match=r"2r <= min.*k_proj.*16x64"):
        Slice().validate(shapes, 9)
    Slice().validate(shapes, 8)
    with pytest.raises(ConfigError, match="r >= 2"):
        LoraGA().validate(shapes, 1)
    with pytest.raises(ConfigError, match="2r"):
        LoraGAPeft().validate(shapes, 9)
    with pytest.raises(ConfigError, match="exceeds"):
        LoRAM().validate(shapes, 17)
    with pytest.raises(ConfigError, match="nullspace_rank"):
        Slice(operator="nullspace", scope="per_module", nullspace_rank=20).validate(shapes, 2)


def test_initializer_yamls_instantiate():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    names = sorted(p.stem for p in (REPO / "conf" / "initializer").glob("*.yaml"))
    assert {"lora_ga", "lora_ga_peft", "slice", "loram", "pissa", "milora", "olora", "eva", "corda"} <= set(names)
    for name in names:
        init = instantiate(OmegaConf.load(REPO / "conf" / "initializer" / f"{name}.yaml"))
        assert init.name == name, name


def test_corda_kpm_on_previous_tasks_records_what_it_used(base_model):
    init = CorDA(method="kpm", calibration="previous", samples=4)
    _, result, _ = _run_protocol(init, copy.deepcopy(base_model), _ctx())
    assert result.stats["calibration_tasks"] == ["cur"]  # stage 1: no previous task to calibrate on
    _, result, _ = _run_protocol(init, copy.deepcopy(base_model), _ctx(stage=3, previous=("prev_a", "prev_b")))
    assert result.stats["calibration_tasks"] == ["prev_a", "prev_b"]


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_slice_c_multirun_reuses_the_stage1_capture(request, tmp_path):
    """`python -m cl_bench --multirun initializer=slice initializer.c=1.0,0.5,0.0` on the tiny model."""
    try:
        tiny_model_dir = request.getfixturevalue("tiny_model_dir")  # from tests/conftest.py
    except pytest.FixtureLookupError:
        pytest.skip("no tiny_model_dir fixture (tests/conftest.py) to point the runner at the tiny model")
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "cl_bench",
        "--multirun",
        "initializer=slice",
        "initializer.c=1.0,0.5,0.0",
        "sequence=synthetic_conflict",
        "sequence.tasks=[sentiment,sentiment_flip]",
        "sequence.n_train=32",
        "model.builder=null",
        f"model.name_or_path={tiny_model_dir}",
        f"cache.dir={tmp_path / 'cache'}",
        "general_eval=none",
        "trainer.max_steps=2",
        "evaluation.limit=4",
        "progress=false",
        "device=cpu",
        "initializer.capture_steps=2",
        "initializer.capture_batch_size=4",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(3)]
    stage1 = [j["stages"][0]["init"] for j in jobs]
    assert stage1[0]["capture"]["current"]["cache"] == "miss"
    assert [s["cache"]["init"] for s in stage1[1:]] == ["hit", "hit"]
    assert all(s["projection"] == "skipped: no previous task" for s in stage1)
    stage2 = [j["stages"][1]["init"] for j in jobs]
    for s, c in zip(stage2, (1.0, 0.5, 0.0)):
        assert s["c"] == c and isinstance(s["cos_global"], float) and "gamma" in s and "fired" in s
        assert s["method"] == "slice" and s["seconds"]["total"] > 0
    # same stage-1 result -> same model state at stage 2 -> its captures are shared too
    assert stage2[1]["capture"]["current"]["cache"] == "hit"
    assert stage2[2]["capture"]["previous"][0]["cache"] == "hit"
    assert "cache hit" in (proc.stdout + proc.stderr) or any("cache hit" in p.read_text() for p in sweep.rglob("*.log"))


# --------------------------------------------------------------------------- scales
@pytest.mark.parametrize("rslora, adjust", [(True, True), (True, False), (False, True)])
def test_eva_rank_redistribution_keeps_the_configured_scaling_per_module(base_model, rslora, adjust):
    """rho = 2 moves rank between modules. adjust_scaling_factors: every module keeps the configured
    s (rsLoRA α/√r = 4, standard α/r = 2); without it, the convention at the module's own rank.
    PEFT alone gives α·√r_m/r under rsLoRA (2.8…5.7 here instead of 4)."""
    scaling = 8 / RANK**0.5 if rslora else 8 / RANK
    ctx = dataclasses.replace(_ctx(), scaling=scaling, scaling_convention="rslora" if rslora else "standard")
    init = EVA(rho=2.0, tau=0.9, use_label_mask=False, steps=4, batch_size=8, adjust_scaling_factors=adjust)
    peft_model, result, _ = _run_protocol(init, copy.deepcopy(base_model), ctx, rslora=rslora)
    layers = lora_layers(peft_model)
    ranks = {name: int(layer.r["default"]) for name, layer in layers.items()}
    assert len(set(ranks.values())) > 1  # the redistribution happened
    for name, layer in layers.items():
        per_rank = ranks[name] ** 0.5 if rslora else ranks[name]
        expected = scaling if adjust else 8 / per_rank
        assert layer.scaling["default"] == pytest.approx(expected), name
        assert layer.lora_alpha["default"] / per_rank == pytest.approx(expected), name  # α and r agree
    assert result.stats["scaling"]["min"] == pytest.approx(min(l.scaling["default"] for l in layers.values()))


def test_lora_ga_stable_scale_is_the_original_formula(base_model):
    """scale=stable: A, B = ζ·(V[:, r:2r]ᵀ, U[:, :r]) with ζ = d_out^(1/4)/√γ, no singular values."""
    ctx = _ctx()
    result, peft_model = _factors(LoraGA(scale="stable", stable_gamma=9, svd="exact", **SMALL), base_model, ctx)
    layers = lora_layers(peft_model)
    weights = {n: base_weight(l) for n, l in layers.items()}
    g = capture_gradients(peft_model, weights, make_batches(ctx.current, 2, 4, ctx.seed)).grads
    d_outs = set()
    for name, layer in layers.items():
        U, _, Vh = torch.linalg.svd(g[name].double())
        d_out = layer.out_features
        d_outs.add(d_out)
        zeta = d_out**0.25 / 3.0
        A, B = result.factors[name]
        # singular vectors are defined up to sign: compare the rank-one pieces B[:, k] A[k, :] instead
        assert torch.allclose(
            (A.double().T @ A.double()), zeta**2 * (Vh[RANK : 2 * RANK].T @ Vh[RANK : 2 * RANK]), atol=1e-5
        )
        assert torch.allclose(B.double() @ B.double().T, zeta**2 * (U[:, :RANK] @ U[:, :RANK].T), atol=1e-5)
    assert d_outs == {32, 64}  # attention and MLP widths both checked
    assert result.stats["scale"] == "stable" and result.stats["stable_gamma"] == 9.0
    assert result.stats["beta"]["min"] == pytest.approx(32**0.25 / 3) and result.stats["beta"]["max"] == pytest.approx(
        64**0.25 / 3
    )
    with pytest.raises(ConfigError, match="initializer.scale"):
        LoraGA(scale="peft")


def test_lora_ga_peft_folds_singular_values_into_b_only(base_model):
    """What PEFT's variant does (its YAML/docstring): A = V[:, :r]ᵀ orthonormal and unscaled,
    B = U[:, r:2r]·diag(S[r:2r])·ζ (ArB2r, stable)."""
    ctx = _ctx()
    model = copy.deepcopy(base_model)
    probe = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=RANK, lora_alpha=8, target_modules=TARGETS))
    probe_layers = lora_layers(probe)
    g = capture_gradients(
        probe, {n: base_weight(l) for n, l in probe_layers.items()}, list(make_batches(ctx.current, 2, 4, ctx.seed))
    ).grads
    peft_model, _, _ = _run_protocol(LoraGAPeft(stable_gamma=9, **SMALL), model, ctx)
    for name, layer in lora_layers(peft_model).items():
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        S = torch.linalg.svdvals(g[name].double())
        zeta = layer.out_features**0.25 / 3.0
        assert torch.allclose(A @ A.T, torch.eye(RANK, dtype=torch.float64), atol=1e-4), name
        assert torch.allclose(B.norm(dim=0), zeta * S[RANK : 2 * RANK], rtol=1e-2), name

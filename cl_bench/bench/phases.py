"""The bench phases of every model (`python -m cl_bench.bench`, cl_bench/bench/cli.py): each phase_*
builds what it measures from scratch and returns table rows; bench/dispatch.py runs them by name, each
in its own process (recipes.isolated). The real-model phases are in real.py, evals.py and runs.py.
"""

from __future__ import annotations

import copy
import random
import tempfile
import time

import torch

from ..infra import memory
from ..run.config import CONF_DIR
from . import recipes
from .setup import (
    TARGETS,
    Bench,
    ModelSpec,
    build_model,
    context,
    encoder_for,
    memory_peak,
    n_params,
    row,
    sync_device,
    wrap,
)


# ------------------------------------------------------------------------------ phases
def phase_init(b: Bench, spec: ModelSpec, stage: int, max_tokens: int | None = None) -> list[dict]:
    """SLICE (c = 1, pcgrad, global) at `stage`, cache off: capture, projection + SVD, absorption;
    `max_tokens`: initializer.capture_max_tokens (tokens per capture forward pass)."""
    from ..initializers.gradient import Slice
    from ..lora.layers import WeightMaster, apply_init, set_scaling

    model, tok = build_model(spec, b)
    encoder = encoder_for(tok, spec)
    master = WeightMaster.attach(model, TARGETS)
    peft = wrap(model, spec)
    ctx = context(b, spec, encoder, stage)
    ctx.master = master
    init = Slice(
        c=1.0,
        capture_steps=spec.capture_steps,
        capture_batch_size=spec.capture_batch_size,
        capture_max_tokens=max_tokens,
    )
    tasks = [*ctx.previous, ctx.current]
    examples = spec.capture_steps * spec.capture_batch_size * len(tasks)
    tokens = sum(
        sum(
            int(x["attention_mask"].sum())
            for x in encoder.batches(t, spec.capture_steps, spec.capture_batch_size, ctx.seed)
        )
        for t in tasks
    )
    memory.reset_peak(b.device)
    t0 = b.clock()
    result = init.init(peft, ctx)
    set_scaling(peft, ctx.adapter, "rslora")
    t1 = time.perf_counter()
    apply_init(peft, result, ctx.adapter, master)
    sync_device(b.device)
    absorb_wall = time.perf_counter() - t1
    total = b.since(t0)
    peak = memory_peak(b.device)
    sec = result.stats["seconds"]
    # init.py times its parts in wall seconds; on the CPU basis each part gets its share of the CPU time
    share = total["seconds"] / total["wall_s"] if total["wall_s"] > 0 else 1.0
    part = lambda wall: {"seconds": wall * share, "wall_s": wall}  # noqa: E731
    fwd = sum(
        i.get("forward_passes") or 0 for i in [result.stats["capture"]["current"], *result.stats["capture"]["previous"]]
    )
    label = f"SLICE stage {stage} ({len(tasks)} task{'s' if len(tasks) > 1 else ''} x {spec.capture_steps}x{spec.capture_batch_size})"
    if max_tokens:
        label += f", capture_max_tokens={max_tokens}"
    return [
        row(
            spec.name,
            "capture",
            label,
            part(sec["capture"]),
            tokens=tokens,
            examples=examples,
            **peak,
            forward_passes=fwd,
        ),
        row(
            spec.name,
            "svd/projection",
            f"{label}: projection + SVD r={spec.rank}",
            part(sec["projection"] + sec["svd"]),
            **peak,
            modules=len(result.factors),
        ),
        row(spec.name, "absorb", f"{label}: W -= s·B0·A0", part(absorb_wall), **peak),
        row(spec.name, "init total", label, total, tokens=tokens, examples=examples, **peak, stage=stage),
    ]


def phase_csweep(b: Bench, spec: ModelSpec) -> list[dict]:
    """c in (0.5, 0.75, 1.0) through one content cache, at stage 1 (the whole init is shared) and
    at stage 2 on one model state (captures shared, projection and SVD per c)."""
    from ..initializers.gradient import Slice

    model, tok = build_model(spec, b)
    encoder = encoder_for(tok, spec)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cl_bench_csweep_") as cache:
        for stage in (1, 2):
            for c in (0.5, 0.75, 1.0):
                peft = wrap(copy.deepcopy(model), spec)  # wrapping edits the model: each run starts from the same one
                ctx = context(b, spec, encoder, stage, cache_dir=cache)
                init = Slice(
                    c=c, threshold=0.99, capture_steps=spec.capture_steps, capture_batch_size=spec.capture_batch_size
                )
                t0 = b.clock()
                stats = init.init(peft, ctx).stats
                total = b.since(t0)
                caps = [stats.get("capture", {}).get("current", {}), *stats.get("capture", {}).get("previous", [])]
                hit = stats["cache"]["init"] == "hit"
                rows.append(
                    row(
                        spec.name,
                        "c sweep",
                        f"stage {stage} c={c}",
                        total,
                        stage=stage,
                        c=c,
                        init_cache=stats["cache"]["init"],
                        capture_cache=",".join(str(i.get("cache")) for i in caps),
                        capture_s=0.0
                        if hit
                        else sum(float(i.get("seconds") or 0) for i in caps) * total["seconds"] / total["wall_s"],
                        cache_key_s=(stats.get("seconds") or {}).get("cache_key"),
                    )
                )
                del peft
    return rows


def phase_train(b: Bench, spec: ModelSpec, variants: list[str], *, fixed_len: bool = False) -> list[dict]:
    """Training steps of the current task from one initial adapter, per variant (min over
    interleaved repeats); checks that every exact variant reaches the same losses. On the CPU the
    matmul ceiling is measured first, in this process on its threads (real.matmul_ceiling)."""
    from .real import matmul_ceiling, target_shapes

    model, tok = build_model(spec, b)
    encoder = encoder_for(tok, spec)
    peft = wrap(model, spec)
    ctx = context(b, spec, encoder, 1)
    task = ctx.current
    if fixed_len:  # every row exactly max_len tokens, every token trained: 4·N·tokens is the model FLOPs
        task = _fixed_length_task(tok, spec, task)
        encoder.mask_prompt = False
        ctx.current = task
    ceiling = None
    if b.device.type == "cpu":
        tokens = spec.batch_size * spec.max_len // 2
        ceiling = matmul_ceiling(b.device, target_shapes(peft, TARGETS), tokens, spec.ceiling_square)
    start = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    results: dict[str, dict] = {}
    for rep in range(b.repeats):
        for v in variants[rep % len(variants) :] + variants[: rep % len(variants)]:  # rotate: spread drift
            with torch.no_grad():
                for n, p in peft.named_parameters():
                    if n in start:
                        p.copy_(start[n])
            torch.manual_seed(0)
            memory.reset_peak(b.device)
            t0 = b.clock()
            info = _train_variant(b, spec, v, peft, tok, encoder, ctx, task)
            t = b.since(t0)
            prev = results.get(v)
            if prev is None:
                results[v] = {**info, "t": t, "first_seconds": t["seconds"], **memory_peak(b.device)}
            elif t["seconds"] < prev["t"]["seconds"]:
                prev["t"] = t
    rows = _train_rows(b, spec, results, n_params(peft), ceiling, fixed_len)
    if ceiling:
        label = f"matmul ceiling: fp32 {ceiling['square']}³ torch.mm in the training process"
        rows.append(
            row(spec.name, "ceiling", label, 0.0, key="ceiling", gflops=ceiling["fp32_square_gflops"], **ceiling)
        )
    return rows


def _train_variant(b: Bench, spec: ModelSpec, v: str, peft, tok, encoder, ctx, task) -> dict:
    """One training variant from the current adapter: the authors' recipe (reference), a
    hand-written HF Trainer + PEFT loop (hf_trainer), or cl_bench's trainer with a layout and
    options ("group+ckpt"). Returns its loss curve and token counts."""
    from omegaconf import OmegaConf

    from ..stage import Regularizer
    from ..train.trainer import train_stage
    from .real import hf_trainer_train

    if v in ("reference", "hf_trainer"):
        if v == "hf_trainer":
            args = (spec.train_steps, spec.batch_size, spec.grad_accum)
            out = hf_trainer_train(peft, tok, encoder, task, ctx.seed, *args)
        else:
            args = (spec.train_steps, spec.batch_size, spec.grad_accum, b.device)
            out = recipes.reference_train(peft, encoder, task, ctx.seed, *args)
            out["logit_positions"] = out["fed_tokens"]
        out.setdefault("forward_passes", spec.train_steps * spec.grad_accum)
        return out
    layout, *opts = v.split("+")
    cfg = OmegaConf.create(
        dict(
            lr=1e-4,
            weight_decay=0.0,
            warmup_ratio=0.01,
            epochs=3,
            batch_size=spec.batch_size,
            grad_accum=spec.grad_accum,
            max_grad_norm=1.0,
            total_steps=spec.train_steps,
            checkpoint_every_steps=0,
            layout=layout,
            log_every_steps=10,
            compile="compile" in opts,
            gradient_checkpointing="ckpt" in opts,
        )
    )
    summary = train_stage(peft, ctx, encoder, cfg, Regularizer(), progress=False)
    th = summary["throughput"]
    return {
        "loss_curve": summary["loss_curve"],
        "tokens": th["tokens"],
        "fed_tokens": th["fed_tokens"],
        "examples": th["examples"],
        "logit_positions": th["trained_tokens"],
        "forward_passes": th["forward_passes"],
    }


TRAIN_NAMES = {
    "reference": "authors' recipe (pad 16, all logits, foreach AdamW, sync per micro-batch)",
    "hf_trainer": "HF Trainer + PEFT by hand (transformers.Trainer, DataCollatorForSeq2Seq, defaults)",
}


def _train_rows(b: Bench, spec: ModelSpec, results: dict, sizes: dict, ceiling: dict | None, fixed_len: bool) -> list:
    """The rows of phase_train: seconds, tokens/s, padding, GFLOP/s (4·N·tokens, real.py) and its
    share of the matmul ceiling, loss difference to the padded layout."""
    rows = []
    ref = results.get("pad") or next(iter(results.values()))
    for v, r in results.items():
        flops = 4 * (sizes["layers"] * r["tokens"] + sizes["lm_head"] * r["logit_positions"])
        same = max(abs(a - c) / max(abs(c), 1e-12) for a, c in zip(r["loss_curve"], ref["loss_curve"]))
        gflops = flops / r["t"]["seconds"] / 1e9
        extra = {
            "fed_tokens": r["fed_tokens"],
            "padding": 1 - r["tokens"] / r["fed_tokens"],
            "forward_passes": r["forward_passes"],
            "loss_last": r["loss_curve"][-1] if r["loss_curve"] else None,
            "loss_rel_diff_vs_pad": same,
            "peak_mb": r["peak_mb"],
            "peak_kind": r["peak_kind"],
            "model_tflop": flops / 1e12,
            "gflops": gflops,
            "of_ceiling": gflops / ceiling["fp32_square_gflops"] if ceiling else None,
            "tflops": flops / r["t"]["seconds"] / 1e12 if b.device.type == "cuda" else None,
            "warmup_s": r["first_seconds"] - r["t"]["seconds"],
        }
        name = TRAIN_NAMES.get(v, v)
        if fixed_len:
            name = f"{name}, fixed {spec.max_len} tokens, all trained"
        rows.append(row(spec.name, "train", name, r["t"], tokens=r["tokens"], examples=r["examples"], key=v, **extra))
    return rows


def _fixed_length_task(tok, spec: ModelSpec, like):
    """Examples whose encoding is exactly max_len tokens (a long prompt cut in the middle)."""
    from ..data.tasks.base import Example, TaskData
    from ..data.wordlists import NOUNS

    rng = random.Random(0)
    ex = [
        Example(f"fixed-{i}", " ".join(rng.choice(NOUNS) for _ in range(4 * spec.max_len)), "cat") for i in range(256)
    ]
    return TaskData("fixed_length", "exact_match", ex, ex[:1])


def phase_merge(b: Bench, spec: ModelSpec) -> list[dict]:
    """Absorb: W += s·B·A for every target, then the adapter is removed (merge=absorb)."""
    from ..lora.layers import WeightMaster
    from ..mergers.absorb import Absorb

    model, tok = build_model(spec, b)
    master = WeightMaster.attach(model, TARGETS)
    peft = wrap(model, spec)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    ctx = context(b, spec, encoder_for(tok, spec), 1)
    ctx.master = master
    memory.reset_peak(b.device)
    t0 = b.clock()
    Absorb().consolidate(peft, ctx)
    return [
        row(
            spec.name,
            "merge",
            f"absorb {len(TARGETS)} modules x layers, r={spec.rank}",
            b.since(t0),
            **memory_peak(b.device),
        )
    ]


def phase_gpip(b: Bench, spec: ModelSpec) -> list[dict]:
    """GP/IP through lm-eval on the generated benchmarks (conf/general_eval/synthetic.yaml,
    spec.gpip_limit documents each): spec.gpip_batches (CPU; default 1 against 32) or 1 against
    auto (CUDA)."""
    import contextlib
    import io

    from omegaconf import OmegaConf

    from ..data.prompts import PromptFormat
    from ..evaluation import general as ge

    model, tok = build_model(spec, b)
    base = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "general_eval" / "synthetic.yaml"))
    base["limit"] = spec.gpip_limit
    rows = []
    with tempfile.TemporaryDirectory(prefix="cl_bench_gpip_") as work:
        for bs in spec.gpip_batches if b.device.type != "cuda" else (1, "auto"):
            memory.reset_peak(b.device)
            t0 = b.clock()
            with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's progress bars (it passes disable=False)
                out = ge.evaluate_general(
                    model,
                    tok,
                    {**base, "batch_size": bs},
                    data_root=None,
                    work_dir=f"{work}/{bs}",
                    device=b.device,
                    seed=0,
                    prompt=PromptFormat(),
                )
            t = b.since(t0)
            docs = spec.gpip_limit * len(base["benchmarks"]) * 2  # every benchmark zero- and few-shot
            rows.append(
                row(
                    spec.name,
                    "GP/IP",
                    f"lm-eval batch {bs}",
                    t,
                    examples=docs,
                    scores={
                        **{f"0-shot {k}": v for k, v in out["zero_shot"].items()},
                        **{f"few-shot {k}": v for k, v in out["few_shot"].items()},
                    },
                    **memory_peak(b.device),
                )
            )
    return rows


def phase_exact(b: Bench, spec: ModelSpec) -> list[dict]:
    """Whole tiny-model runs through the runner on the CPU (2 stages of synthetic_conflict),
    with and without each option that claims exactness: trainer.layout group vs pad (vanilla
    init, then SLICE), SLICE from a fresh init cache (miss) then again from it (hit) vs cache
    off, row 0 from the prediction cache (miss, then hit) vs cache off, and the evaluation's
    count batching vs the token budget. Rows give whether results.json's matrix and the
    predictions files are the same and the largest relative difference of the loss curves to
    the reference run."""
    import contextlib
    import io

    from hydra import compose, initialize_config_dir

    from ..run.runner import run

    # (label, initializer, layout, overrides, reference label)
    off, on = ["cache.enabled=false"], ["cache.enabled=true", "cache.row0=false"]
    variants = [
        ("vanilla, layout=pad", "vanilla", "pad", off, None),
        ("vanilla, layout=group", "vanilla", "group", off, "vanilla, layout=pad"),
        ("slice, layout=pad", "slice", "pad", off, None),
        ("slice, layout=group", "slice", "group", off, "slice, layout=pad"),
        ("slice, layout=group, cache miss", "slice", "group", on, "slice, layout=group"),
        ("slice, layout=group, cache hit", "slice", "group", on, "slice, layout=group"),
        ("vanilla, row 0 cache miss", "vanilla", "group", ["cache.enabled=true"], "vanilla, layout=group"),
        ("vanilla, row 0 cache hit", "vanilla", "group", ["cache.enabled=true"], "vanilla, layout=group"),
        (
            "vanilla, eval " + _other_batching()[0],
            "vanilla",
            "group",
            off + _other_batching()[1],
            "vanilla, layout=group",
        ),
    ]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cl_bench_exact_") as work:
        for label, init, layout, extra, ref in variants:
            over = _exact_overrides(b, init, layout, f"{work}/cache") + extra
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="config", overrides=over)
            run_dir = f"{work}/{len(rows)}"
            t0 = b.clock()
            with contextlib.redirect_stdout(io.StringIO()):  # the run's console summary
                res = run(cfg, run_dir, stream=io.StringIO())
            rows[label] = row(
                spec.name,
                "exactness",
                label,
                b.since(t0),
                key=label,
                reference=ref,
                matrix=res["matrix"],
                loss_curves=[s["train"]["loss_curve"] for s in res["stages"]],
                init_cache=[(s["init"].get("cache") or {}).get("init") for s in res["stages"]],
                predictions=_predictions(run_dir),
            )
    for r in rows.values():
        if r["reference"] is not None:
            ref = rows[r["reference"]]
            r.update(
                same_matrix=r["matrix"] == ref["matrix"],
                same_losses=r["loss_curves"] == ref["loss_curves"],
                same_predictions=r["predictions"] == ref["predictions"],
                loss_rel_diff=max(
                    abs(x - y) / max(abs(y), 1e-12)
                    for u, v in zip(r["loss_curves"], ref["loss_curves"])
                    for x, y in zip(u, v)
                ),
            )
    for r in rows.values():
        r.pop("predictions")
    return list(rows.values())


def _exact_overrides(b: Bench, init: str, layout: str, cache: str) -> list[str]:
    """The tiny two-stage run of phase_exact (Hydra overrides)."""
    from ..data.tiny_model import ensure_tiny_model

    over = [
        "sequence=synthetic_conflict",
        "sequence.tasks=[sentiment,parity]",
        "sequence.n_train=48",
        "sequence.n_eval=8",
        "trainer.max_steps=4",
        "evaluation.max_new_tokens=6",
        "general_eval=none",
        "progress=false",
        f"threads={b.threads}",
        "device=cpu",  # the claim is CPU exactness (bf16 autocast on CUDA is not bitwise)
        "model.builder=null",
        f"model.name_or_path={ensure_tiny_model(b.cache_dir, log=lambda s: None)}",
        f"initializer={init}",
        f"trainer.layout={layout}",
        f"cache.dir={cache}",
    ]
    if init == "slice":
        over += ["initializer.capture_steps=2", "initializer.capture_batch_size=8"]
    return over


def _other_batching() -> tuple[str, list[str]]:
    """The evaluation batching the defaults do not use: count batching when the defaults have a
    token budget, else a token budget (label, overrides)."""
    from .evals import eval_defaults

    if eval_defaults(torch.device("cpu"))["max_batch_tokens"] is not None:
        return "count batching", ["evaluation.max_batch_tokens=null"]
    return "token budget", ["evaluation.max_batch_tokens=2048", "evaluation.decode_step_tokens=8"]


def _predictions(run_dir: str) -> dict[str, str]:
    """Every predictions file of a run dir, by path relative to it."""
    from pathlib import Path

    root = Path(run_dir)
    return {str(p.relative_to(root)): p.read_text() for p in sorted((root / "predictions").rglob("*.jsonl"))}

"""The bench phases (`python -m cl_bench.bench`, cl_bench/bench/cli.py): each phase_* builds what it
measures from scratch and returns table rows; `isolated` runs one in its own forked process on the
CPU (its own memory high-water mark), and `run_phase` runs a named phase of one model spec.
"""

from __future__ import annotations

import copy
import math
import os
import random
import tempfile
import time
import traceback
from collections.abc import Callable

import torch

from ..infra import memory
from ..run.config import CONF_DIR
from .setup import (
    CURRENT,
    PREVIOUS,
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


# ------------------------------------------------------------------------------ isolation
def isolated(b: Bench, fn: Callable[[], list[dict]]) -> list[dict]:
    """fn() in a forked child on the CPU (its own RSS high-water mark), in-process on CUDA
    (a forked child cannot use CUDA; CUDA peaks are reset per phase instead)."""
    if b.device.type == "cuda" or not hasattr(os, "fork"):
        out = fn()
        if b.device.type == "cuda":
            torch.cuda.empty_cache()
        return out
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def run() -> None:
        torch.set_num_threads(b.threads)
        try:
            child.send(("ok", fn()))
        except BaseException:  # noqa: BLE001 - reported by the parent
            child.send(("error", traceback.format_exc()))

    proc = ctx.Process(target=run)
    proc.start()
    status, payload = parent.recv()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"bench phase failed in its child process:\n{payload}")
    return payload


def run_phase(b: Bench, spec: ModelSpec, phase: str) -> None:
    """Run `phase` (one of ModelSpec.phases) of `spec`, each measurement isolated; rows go to b.rows."""
    if phase == "init":
        for stage in spec.stages:
            b.rows += isolated(b, lambda stage=stage: phase_init(b, spec, stage))
        if spec.capture_max_tokens:  # the last stage again, capture forward passes the size of training's
            b.rows += isolated(b, lambda: phase_init(b, spec, spec.stages[-1], spec.capture_max_tokens))
    elif phase == "csweep":
        b.rows += isolated(b, lambda: phase_csweep(b, spec))
    elif phase == "train":
        variants = list(spec.train_variants) + (["group+compile"] if b.compile else [])
        b.rows += isolated(b, lambda: phase_train(b, spec, variants))
        if b.device.type == "cuda":
            b.rows += isolated(b, lambda: phase_train(b, spec, ["group"], fixed_len=True))
    elif phase == "merge":
        b.rows += isolated(b, lambda: phase_merge(b, spec))
    elif phase == "eval":
        b.rows += isolated(b, lambda: phase_eval(b, spec))
    elif phase == "gpip":
        b.rows += isolated(b, lambda: phase_gpip(b, spec))
    elif phase == "exact":
        b.rows += isolated(b, lambda: phase_exact(b, spec))


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


def reference_train(model, encoder, task, seed: int, steps: int, bs: int, accum: int, device) -> dict:
    """The authors' recipe (HF Trainer defaults): micro-batches of `bs` padded to their longest,
    HF's loss over every position's logits, the foreach AdamW, the loss read every micro-batch."""
    from transformers import get_linear_schedule_with_warmup

    from ..train.loss import trained_tokens

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(0.01 * steps), steps)
    order = encoder.order(task, seed, epochs=math.ceil(steps * bs * accum / len(task.train)) + 1)
    autocast = device.type == "cuda"
    losses, tokens, fed = [], 0, 0
    model.train()
    for step in range(steps):
        micro = [
            encoder.batch(task, order[(step * accum + m) * bs : (step * accum + m + 1) * bs], device)
            for m in range(accum)
        ]
        n_items = sum(trained_tokens(x) for x in micro)
        lm = 0.0
        for x in micro:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(**x, num_items_in_batch=n_items).loss
            loss.backward()
            lm += float(loss.detach())  # a host sync per micro-batch, as the Trainer's logging did
            tokens += int(x["attention_mask"].sum())
            fed += x["input_ids"].numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(lm)
    model.eval()
    return {"loss_curve": losses, "tokens": tokens, "fed_tokens": fed, "examples": steps * bs * accum}


def phase_train(b: Bench, spec: ModelSpec, variants: list[str], *, fixed_len: bool = False) -> list[dict]:
    """Training steps of the current task from one initial adapter, per variant (min over
    interleaved repeats); checks that every exact variant reaches the same losses."""
    from omegaconf import OmegaConf

    from ..stage import Regularizer
    from ..train.trainer import train_stage

    model, tok = build_model(spec, b)
    encoder = encoder_for(tok, spec)
    peft = wrap(model, spec)
    ctx = context(b, spec, encoder, 1)
    task = ctx.current
    if fixed_len:  # every row exactly max_len tokens, every token trained: 4·N·tokens is the model FLOPs
        task = _fixed_length_task(tok, spec, task)
        encoder.mask_prompt = False
        ctx.current = task
    start = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    sizes = n_params(peft)
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
            if v == "reference":
                out = reference_train(
                    peft, encoder, task, ctx.seed, spec.train_steps, spec.batch_size, spec.grad_accum, b.device
                )
                info = {
                    "loss_curve": out["loss_curve"],
                    "tokens": out["tokens"],
                    "fed_tokens": out["fed_tokens"],
                    "examples": out["examples"],
                    "logit_positions": out["fed_tokens"],
                    "forward_passes": spec.train_steps * spec.grad_accum,
                }
            else:
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
                info = {
                    "loss_curve": summary["loss_curve"],
                    "tokens": th["tokens"],
                    "fed_tokens": th["fed_tokens"],
                    "examples": th["examples"],
                    "logit_positions": th["trained_tokens"],
                    "forward_passes": th["forward_passes"],
                }
            t = b.since(t0)
            prev = results.get(v)
            if prev is None:
                results[v] = {**info, "t": t, "first_seconds": t["seconds"], **memory_peak(b.device)}
            elif t["seconds"] < prev["t"]["seconds"]:
                prev["t"] = t
    rows = []
    ref = results.get("pad") or next(iter(results.values()))
    for v, r in results.items():
        flops = 4 * (sizes["layers"] * r["tokens"] + sizes["lm_head"] * r["logit_positions"])
        same = max(abs(a - c) / max(abs(c), 1e-12) for a, c in zip(r["loss_curve"], ref["loss_curve"]))
        extra = {
            "fed_tokens": r["fed_tokens"],
            "padding": 1 - r["tokens"] / r["fed_tokens"],
            "forward_passes": r["forward_passes"],
            "loss_last": r["loss_curve"][-1],
            "loss_rel_diff_vs_pad": same,
            "peak_mb": r["peak_mb"],
            "peak_kind": r["peak_kind"],
            "model_tflop": flops / 1e12,
            "tflops": flops / r["t"]["seconds"] / 1e12 if b.device.type == "cuda" else None,
            "warmup_s": r["first_seconds"] - r["t"]["seconds"],
        }
        name = {"reference": "authors' recipe (pad 16, all logits, foreach AdamW, sync per micro-batch)"}.get(v, v)
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


def phase_eval(b: Bench, spec: ModelSpec) -> list[dict]:
    """Greedy evaluation of two tasks: unbatched, the authors' recipe (batch 8 in data order, a
    fixed number of new tokens, the tokenizer's EOS only), ours (evaluation.py defaults)."""
    from ..data.prompts import PromptFormat, pad_id_of
    from ..data.tasks.base import TaskData
    from ..evaluation.seen import evaluate_task

    model, tok = build_model(spec, b)
    tasks = [b.tasks[CURRENT], b.tasks[PREVIOUS[-1]]]
    tasks = [TaskData(t.name, t.metric, t.train, t.eval[: spec.eval_examples], labels=t.labels) for t in tasks]
    n = sum(len(t.eval) for t in tasks)
    common = dict(
        max_new_tokens=spec.eval_new_tokens,
        max_prompt_len=spec.eval_prompt_len,
        device=b.device,
        prompt=PromptFormat(),
        progress=False,
    )
    variants = {
        "unbatched (batch 1, fixed new tokens)": dict(batch_size=1, reference_margin=None),
        "authors' recipe (batch 8, data order, fixed new tokens)": None,
        "ours (batch 64 by token length, per-task new-token budget)": dict(batch_size=64, reference_margin=8),
    }
    rows, scores = [], {}
    for label, kw in variants.items():
        memory.reset_peak(b.device)
        t0 = b.clock()
        stats = {"generated_tokens": 0, "prompt_tokens": 0}
        total = []
        for t in tasks:
            if kw is None:
                total.append(_authors_eval(model, tok, t, spec, b.device, pad_id_of(tok), stats))
            else:
                s: dict = {}
                total.append(evaluate_task(model, tok, t, stats=s, **common, **kw)[0])
                stats["generated_tokens"] += s["generated_tokens"]
                stats["prompt_tokens"] += s["prompt_tokens"]
        t = b.since(t0)
        scores[label] = total
        rows.append(
            row(
                spec.name,
                "eval",
                label,
                t,
                tokens=stats["prompt_tokens"] + stats["generated_tokens"],
                examples=n,
                generated_tokens=stats["generated_tokens"],
                scores=total,
                **memory_peak(b.device),
            )
        )
    base = next(iter(scores.values()))
    for r in rows:
        r["same_scores_as_unbatched"] = r["scores"] == base
    # The same prompts with every row forced to `forced` new tokens (no early end): the
    # decode-bound regime of a model that answers at length, batch 1 against batch 64.
    from ..data.prompts import render_prompt_ids, truncate_middle

    forced = 32
    prompts = [
        truncate_middle(render_prompt_ids(tok, ex, PromptFormat()), spec.eval_prompt_len)
        for t in tasks
        for ex in t.eval
    ]
    prompts.sort(key=len, reverse=True)
    for bs in (1, 64):
        memory.reset_peak(b.device)
        t0 = b.clock()
        for i in range(0, len(prompts), bs):
            _forced_generate(model, tok, prompts[i : i + bs], forced, b.device)
        rows.append(
            row(
                spec.name,
                "eval",
                f"forced {forced} new tokens, batch {bs}",
                b.since(t0),
                tokens=sum(map(len, prompts)) + forced * len(prompts),
                examples=len(prompts),
                generated_tokens=forced * len(prompts),
                **memory_peak(b.device),
            )
        )
    return rows


@torch.no_grad()
def _forced_generate(model, tok, rows, n: int, device) -> None:
    from ..data.prompts import left_padded, pad_id_of

    batch = {k: v.to(device) for k, v in left_padded(rows, pad_id_of(tok)).items()}
    model.generate(
        **batch,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=pad_id_of(tok),
        eos_token_id=tok.eos_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )


@torch.no_grad()
def _authors_eval(model, tok, task, spec: ModelSpec, device, pad: int, stats: dict) -> float:
    from ..data.prompts import encode_prompts_left_padded
    from ..evaluation.scoring import score

    preds = []
    for i in range(0, len(task.eval), 8):
        batch = {
            k: v.to(device)
            for k, v in encode_prompts_left_padded(tok, task.eval[i : i + 8], spec.eval_prompt_len).items()
        }
        out = model.generate(
            **batch,
            max_new_tokens=spec.eval_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        cont = out[:, batch["input_ids"].shape[1] :]
        stats["generated_tokens"] += cont.numel()
        stats["prompt_tokens"] += int(batch["attention_mask"].sum())
        preds += [tok.decode(c, skip_special_tokens=True).strip() for c in cont]
    metric = task.metric_for("per_task")
    return 100.0 * sum(score(metric, p, ex.all_references, task.labels) for p, ex in zip(preds, task.eval)) / len(preds)


def phase_gpip(b: Bench, spec: ModelSpec) -> list[dict]:
    """GP/IP through lm-eval on the generated benchmarks (conf/general_eval/synthetic.yaml,
    limit 30): batch 1 against batch 32 (CPU) or auto (CUDA)."""
    import contextlib
    import io

    from omegaconf import OmegaConf

    from ..data.prompts import PromptFormat
    from ..evaluation import general as ge

    model, tok = build_model(spec, b)
    base = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "general_eval" / "synthetic.yaml"))
    base["limit"] = 30
    rows = []
    with tempfile.TemporaryDirectory(prefix="cl_bench_gpip_") as work:
        for bs in (1, "auto" if b.device.type == "cuda" else 32):
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
            docs = 30 * len(base["benchmarks"]) * 2  # every benchmark zero- and few-shot
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
    init, then SLICE), and SLICE from a fresh init cache (miss) then again from it (hit) vs cache
    off. Rows give whether results.json's matrix is the same and the largest relative difference
    of the loss curves to the reference run."""
    import contextlib
    import io

    from hydra import compose, initialize_config_dir

    from ..data.tiny_model import ensure_tiny_model
    from ..run.runner import run

    model_dir = ensure_tiny_model(b.cache_dir, log=lambda s: None)
    base = [
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
        f"model.name_or_path={model_dir}",
    ]
    # (label, initializer, layout, cache, reference label)
    variants = [
        ("vanilla, layout=pad", "vanilla", "pad", "off", None),
        ("vanilla, layout=group", "vanilla", "group", "off", "vanilla, layout=pad"),
        ("slice, layout=pad", "slice", "pad", "off", None),
        ("slice, layout=group", "slice", "group", "off", "slice, layout=pad"),
        ("slice, layout=group, cache miss", "slice", "group", "on", "slice, layout=group"),
        ("slice, layout=group, cache hit", "slice", "group", "on", "slice, layout=group"),
    ]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cl_bench_exact_") as work:
        for label, init, layout, cache, ref in variants:
            over = [
                *base,
                f"initializer={init}",
                f"trainer.layout={layout}",
                f"cache.dir={work}/cache",
                f"cache.enabled={cache == 'on'}",
            ]
            if init == "slice":
                over += ["initializer.capture_steps=2", "initializer.capture_batch_size=8"]
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="config", overrides=over)
            t0 = b.clock()
            with contextlib.redirect_stdout(io.StringIO()):  # the run's console summary
                res = run(cfg, f"{work}/{len(rows)}", stream=io.StringIO())
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
            )
    for r in rows.values():
        if r["reference"] is not None:
            ref = rows[r["reference"]]
            r.update(
                same_matrix=r["matrix"] == ref["matrix"],
                same_losses=r["loss_curves"] == ref["loss_curves"],
                loss_rel_diff=max(
                    abs(x - y) / max(abs(y), 1e-12)
                    for u, v in zip(r["loss_curves"], ref["loss_curves"])
                    for x, y in zip(u, v)
                ),
            )
    return list(rows.values())

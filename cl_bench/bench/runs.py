"""Whole runs on the real model (`--model smollm2`, phase `runs`): a cl_bench run (the runner, its
defaults) against the SLICE authors' pipeline as modeled (bench/authors.py) on the same three
SuperNI sample tasks, examples, LoRA and trainer settings, for vanilla, LoRA-GA and SLICE, each in
its own forked process, one pair after the other.

Both evaluate at most `max_new_tokens` new tokens (the authors' 64) with the same prompts. cl_bench
evaluates the seen tasks after every stage like the authors (evaluation.full_matrix=false) and, as
it always does, row 0 (the base model; the authors never evaluate it): in a fresh cache that is a
miss, computed and stored; a second run on the same cache reads it (every run of a sweep after
the first). GP/IP are off on both sides (general_eval=none; the GP/IP phase times lm-eval).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

RUN_TASKS = [
    "task088_identify_typo_verification",
    "task1510_evalution_relation_extraction",
    "task363_sst2_polarity_classification",
]
TINY_TASKS = ["sentiment", "parity"]  # the tiny model's runs (tests): generated tasks, no data needed


def run_sequence(spec) -> dict:
    """The whole runs' sequence: SmolLM2 on three SuperNI sample tasks, the tiny model on two
    generated ones (sequence group, family, tasks)."""
    if spec.name == "tiny":
        return {"group": "synthetic", "family": "synthetic", "tasks": TINY_TASKS}
    return {"group": "ni_samples", "family": "superni", "tasks": RUN_TASKS}


def run_settings(spec) -> dict:
    """The settings both pipelines share (ModelSpec's run_* fields)."""
    from .setup import TARGETS

    return dict(
        rank=spec.rank,
        alpha=spec.alpha,
        targets=TARGETS,
        max_len=spec.max_len,
        batch_size=spec.batch_size,
        epochs=1,
        seed=42,
        capture_steps=spec.capture_steps,
        capture_batch_size=spec.capture_batch_size,
        max_new_tokens=spec.eval_new_tokens,
        max_prompt_len=spec.eval_prompt_len,
        n_train=spec.run_train,
        n_eval=spec.run_eval,
    )


def ours_overrides(b, spec, init: str, s: dict, cache: str) -> list[str]:
    """The cl_bench run of `init` with settings `s` (Hydra overrides)."""
    seq = run_sequence(spec)
    over = [
        f"model={'tiny' if spec.name == 'tiny' else 'smollm2'}",
        f"sequence={seq['group']}",
        "sequence.name=bench_runs",
        f"sequence.tasks=[{','.join(seq['tasks'])}]",
        f"sequence.n_train={s['n_train']}",
        f"sequence.n_eval={s['n_eval']}",
        *([f"data.root={b.data_root}"] if b.data_root else []),
        f"lora.r={s['rank']}",
        f"lora.alpha={s['alpha']}",
        f"trainer.max_len={s['max_len']}",
        f"trainer.batch_size={s['batch_size']}",
        "trainer.grad_accum=1",
        f"trainer.epochs={s['epochs']}",
        f"evaluation.max_new_tokens={s['max_new_tokens']}",
        f"evaluation.max_prompt_len={s['max_prompt_len']}",
        "evaluation.full_matrix=false",
        "general_eval=none",
        "progress=false",
        f"threads={b.threads}",
        f"seed={s['seed']}",
        f"cache.dir={cache}",
        f"initializer={init}",
    ]
    if init != "vanilla":
        over += [
            f"initializer.capture_steps={s['capture_steps']}",
            f"initializer.capture_batch_size={s['capture_batch_size']}",
        ]
    return over


def _ours(b, spec, init: str, cache: str, label: str) -> list[dict]:
    from hydra import compose, initialize_config_dir

    from ..run.config import CONF_DIR
    from ..run.runner import run
    from .setup import memory_peak, row

    s = run_settings(spec)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=ours_overrides(b, spec, init, s, cache))
    with tempfile.TemporaryDirectory(prefix="cl_bench_run_") as run_dir:
        t0 = b.clock()
        with contextlib.redirect_stdout(io.StringIO()):
            res = run(cfg, run_dir, stream=io.StringIO())
        t = b.since(t0)
    share = t["seconds"] / t["wall_s"] if t["wall_s"] else 1.0  # stage seconds are wall: their CPU share
    parts = {k: 0.0 for k in ("init", "train", "end_stage", "merge", "eval")}
    for st in res["stages"]:
        for k, v in st["seconds"].items():
            parts[k] = parts.get(k, 0.0) + v * share
    examples = sum(int(x["train"].get("throughput", {}).get("examples") or 0) for x in res["stages"])
    return [
        row(
            spec.name,
            "whole run",
            f"cl_bench {init} ({label})",
            t,
            key=f"ours:{init}:{label}",
            init=init,
            parts=parts,
            row0_and_rest_s=t["seconds"] - sum(parts.values()),
            matrix=res["matrix"],
            examples=examples,
            **memory_peak(b.device),
        )
    ]


def _authors(b, spec, init: str) -> list[dict]:
    from .authors import authors_run
    from .setup import build_model, memory_peak, row

    s = run_settings(spec)
    tasks = _tasks(b, spec, s)
    t0 = b.clock()
    model, tok = build_model(spec, b)
    t_load = b.since(t0)
    clock = time.process_time if b.basis == "cpu" else time.perf_counter
    out = authors_run(model, tok, tasks, init=init, settings=s, device=b.device, clock=clock)
    t = b.since(t0)
    return [
        row(
            spec.name,
            "whole run",
            f"authors' pipeline (as modeled) {init}",
            t,
            key=f"authors:{init}",
            init=init,
            parts={"load": t_load["seconds"], **out["seconds"]},
            matrix=out["matrix"],
            **memory_peak(b.device),
        )
    ]


def _tasks(b, spec, s: dict) -> list:
    from omegaconf import OmegaConf

    from ..data.tasks import load_sequence

    seq = run_sequence(spec)
    cfg = {"name": "bench_runs", "family": seq["family"], "tasks": seq["tasks"]}
    return load_sequence(
        OmegaConf.create({**cfg, "n_train": s["n_train"], "n_eval": s["n_eval"]}), b.data_root, s["seed"]
    )


def fresh_cache(b, dest: Path) -> Path:
    """A result cache without results at `dest` (no inits, no row-0 predictions) that links the
    bench cache's converted and built models (gguf/, tiny-llama-*), which are inputs, not results."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in Path(b.cache_dir).glob("*"):
        if src.is_dir() and (src.name == "gguf" or src.name.startswith("tiny-llama-")):
            os.symlink(src, dest / src.name)
    return dest


def phase_runs(b, spec) -> list[dict]:
    """Per init of spec.run_inits: the authors' pipeline, then cl_bench on a shared fresh cache
    (its first run misses row 0, the later ones read it), then cl_bench vanilla once more on the
    warm cache. Needs the SuperNI samples (--data-root): without them, no rows (a note says so)."""
    from .recipes import isolated

    if b.data_root is None and spec.name != "tiny":
        b.notes.append(f"{spec.name} whole runs not measured: they need the SuperNI samples (--data-root)")
        return []
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cl_bench_runs_cache_") as cache:
        fresh_cache(b, Path(cache))
        for k, init in enumerate(spec.run_inits):
            rows += isolated(b, lambda init=init: _authors(b, spec, init))
            label = "row 0 computed: cold cache" if k == 0 else "row 0 from the cache"
            rows += isolated(b, lambda init=init, label=label: _ours(b, spec, init, cache, label))
        if spec.run_inits and spec.run_inits[0] == "vanilla":
            rows += isolated(b, lambda: _ours(b, spec, "vanilla", cache, "row 0 from the cache"))
    return rows


def preset_command(b, preset: str, run_dir: str, cache: str, extra: list[str] = ()) -> list[str]:
    """`python -m cl_bench experiment=PRESET` as a user runs it, on the bench's threads and data."""
    import sys

    return [
        sys.executable,
        "-m",
        "cl_bench",
        f"experiment={preset}",
        *([f"data.root={b.data_root}"] if b.data_root else []),
        f"threads={b.threads}",
        "progress=false",
        f"cache.dir={cache}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def phase_preset(b, spec, extra: list[str] = ()) -> list[dict]:
    """One run of the CPU real-model preset (`experiment=real_standard`; the tiny model: `debug`,
    seconds, for the tests) in a fresh process on a fresh
    result cache (row 0 computed; the converted model is shared): wall seconds and the child's CPU
    seconds (getrusage), with the load average around it. On one thread the CPU seconds are what
    the run costs on an idle core, whatever else the machine runs; seconds follows the bench's basis."""
    import resource
    import subprocess

    from .setup import row

    preset = "debug" if spec.name == "tiny" else "real_standard"
    if b.data_root is None and spec.name != "tiny":
        b.notes.append(f"{spec.name} preset not measured: it needs the data (--data-root)")
        return []
    with tempfile.TemporaryDirectory(prefix="cl_bench_preset_") as tmp:
        cache = fresh_cache(b, Path(tmp) / "cache")
        cmd = preset_command(b, preset, str(Path(tmp) / "run"), str(cache), list(extra))
        load0, cpu0 = os.getloadavg(), resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CL_BENCH_CACHE": str(cache)})
        wall = time.perf_counter() - t0
        cpu1, load1 = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()
    if done.returncode != 0:
        raise RuntimeError(f"preset run failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    t = {"seconds": cpu if b.basis == "cpu" else wall, "wall_s": wall, "cpu_s": cpu}
    shown = " ".join(a for a in cmd[3:] if not a.startswith(("cache.dir=", "hydra.run.dir=")))
    load = f"{load0[0]:.2f} -> {load1[0]:.2f}"
    return [
        row(spec.name, "preset", f"python -m cl_bench {shown}", t, key=f"preset:{preset}", threads=b.threads, load=load)
    ]

"""`python -m cl_bench.bench` (`make bench`): what each phase of a stage costs, and how cl_bench
compares with the SLICE authors' recipe (the settings of their released code), side by side
in one run.

Phases, per model: gradient capture, projection + SVD + absorption (SLICE at stage 1 and at
stage 5 with 8 capture steps of 16 per task, the paper's settings), a 3-value c sweep through the
content cache, training (layouts pad / group / pack, the authors' recipe, activation
checkpointing, torch.compile), merge, seen-task evaluation (unbatched, the authors' batch-8 recipe,
ours) and GP/IP through lm-eval; then whole tiny-model runs through the runner on the CPU with
and without each option that claims exactness (layout group vs pad; SLICE's init cache off / miss / hit).
Each row gives wall seconds, tokens/s, examples/s and peak memory; on CUDA also achieved TFLOP/s
of LoRA training next to the device's bf16 peak.

Models: `tiny` (the embedded model; every phase) and `llama3b`, a Llama-3.2-3B-shaped model
built from its published config with random weights (no download; the tiny tokenizer feeds it,
so token counts are the tiny tokenizer's). On CPU the 3B shape runs with `--layers` decoder
layers (default 1, to stay within minutes), training / capture / SVD / merge only; on CUDA with
all 28 and every phase.

Memory: on CUDA, torch's max allocated bytes, reset per phase. On the CPU, each phase runs in a
forked child process whose resident-set high-water mark is reset when the phase starts
(memory.py), so a phase's peak is its own (model included), not the process lifetime's.
Variants that share a child (the training layouts) reset the mark too but may see memory the
previous variant freed and the allocator kept: the first variant of a child is the clean one.

Timing: min over `--repeats` interleaved repeats where noted (a shared machine drifts), all on
the thread count printed at the top (`--threads`, default: the CPUs this process may use).
Data: SuperNI samples from --data-root (default $CL_BENCH_DATA, else a folder shared/data next to
the repository checkout); without them, generated mixed-length tasks, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .phases import run_phase
from .setup import CURRENT, REPO, Bench, ModelSpec, load_tasks
from .targets import device_peak_tflops, print_summary, targets


def specs_for(device: torch.device, args) -> list[ModelSpec]:
    """The model specs of --model: tiny (every phase) and/or llama3b (all phases on CUDA; a few layers, init/train/merge on the CPU)."""
    out = []
    if args.model in ("tiny", "both"):
        out.append(ModelSpec("tiny", rank=8, max_len=256, train_steps=args.steps or 4))
    if args.model in ("llama3b", "both"):
        if device.type == "cuda":
            out.append(
                ModelSpec(
                    "llama3b",
                    layers=args.layers,
                    rank=64,
                    max_len=256,
                    train_steps=args.steps or 8,
                    eval_prompt_len=512,
                    eval_examples=16,
                    capture_max_tokens=None,
                )
            )
        else:  # a shape check in minutes: few layers, short rows, small batches
            out.append(
                ModelSpec(
                    "llama3b",
                    layers=args.layers or 1,
                    rank=64,
                    max_len=128,
                    batch_size=4,
                    grad_accum=1,
                    train_steps=args.steps or 2,
                    capture_steps=2,
                    capture_batch_size=4,
                    stages=(1,),
                    capture_max_tokens=None,
                    phases=("init", "train", "merge"),
                    train_variants=("group", "pad"),
                )
            )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of `python -m cl_bench.bench` (argv None: sys.argv)."""
    parser = argparse.ArgumentParser(
        prog="python -m cl_bench.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("tiny", "llama3b", "both"), default="both")
    parser.add_argument(
        "--layers", type=int, default=None, help="llama3b decoder layers (default: 28 on CUDA, 1 on CPU)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per variant (default: tiny 4, llama3b 8 CUDA / 2 CPU)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="interleaved repeats of the training variants (min is kept)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: the CPUs this process may use)"
    )
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="measure torch.compile (auto: on CUDA only; on the CPU its compilation alone takes minutes)",
    )
    parser.add_argument(
        "--phases", default=None, help="comma-separated subset of init,csweep,train,merge,eval,gpip,exact"
    )
    parser.add_argument("--data-root", default=os.environ.get("CL_BENCH_DATA") or str(REPO.parent / "shared" / "data"))
    parser.add_argument(
        "--cache-dir", default=os.environ.get("CL_BENCH_CACHE", str(Path.home() / ".cache" / "cl_bench"))
    )
    parser.add_argument("--out", default="bench.json", help="where bench.json goes")
    return parser.parse_args(argv)


def make_bench(args: argparse.Namespace) -> tuple[Bench, str]:
    """The Bench of this run on the auto-chosen device, with torch's thread count set; quiets the
    libraries' warnings and progress bars. Returns (bench, where the thread count comes from)."""
    from ..data.models import resolve_device
    from ..infra.jobs import cpu_threads

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's and HF's progress bars would bury the table
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = resolve_device("auto")
    threads, why = cpu_threads(args.threads)
    torch.set_num_threads(threads)
    b = Bench(
        device=device,
        threads=threads,
        cache_dir=args.cache_dir,
        data_root=args.data_root if Path(args.data_root).is_dir() else None,
        repeats=max(1, args.repeats),
        compile=args.compile == "on" or (args.compile == "auto" and device.type == "cuda"),
    )
    b.basis = "cpu" if device.type == "cpu" and threads == 1 else "wall"
    return b, why


def load_data(b: Bench) -> None:
    """The tasks every phase uses, tokenised by the tiny model's tokenizer; prints where they come from."""
    from transformers import AutoTokenizer

    from ..data.tiny_model import ensure_tiny_model

    tok = AutoTokenizer.from_pretrained(ensure_tiny_model(b.cache_dir, log=lambda s: None))
    load_tasks(b, tok)
    b.n_train = len(b.tasks[CURRENT].train)
    print(f"data: {b.data_source}; current task {CURRENT} ({len(b.tasks[CURRENT].train)} train examples)")


def run_all(b: Bench, specs: list[ModelSpec], only: set[str] | None) -> None:
    """Every phase of every spec (only those in `only` when given), printing each one's seconds."""
    for spec in specs:
        phases = [p for p in spec.phases if only is None or p in only]
        if spec.name == "llama3b":
            what = f"{spec.layers or 28} of 28 decoder layers" + (
                " (CPU: reduced to stay within minutes)" if b.device.type != "cuda" else ""
            )
            b.notes.append(
                f"llama3b: Llama-3.2-3B shape, random weights, {what}, max_len {spec.max_len}, "
                f"train batch {spec.batch_size}x{spec.grad_accum}, capture {spec.capture_steps}x{spec.capture_batch_size}"
            )
        for phase in phases:
            t0 = time.time()
            run_phase(b, spec, phase)
            print(f"  {spec.name} {phase}: {time.time() - t0:.1f}s", flush=True)
    if not b.compile:
        b.notes.append(
            "torch.compile not measured (CPU: inductor's compilation of the tiny model takes minutes on 2 cores; "
            "--compile on measures it)"
        )
    if b.device.type != "cuda":
        b.notes.append(
            "CPU run: TFLOP/s and the 40%-of-bf16-peak target need a CUDA device; llama3b eval and GP/IP run on CUDA only"
        )


def main(argv: list[str] | None = None) -> dict:
    """`python -m cl_bench.bench`: run the phases, print the tables, write bench.json (--out);
    returns what was written."""
    args = parse_args(argv)
    b, why = make_bench(args)
    device, threads = b.device, b.threads
    device_name, peak = device_peak_tflops(device)
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.time()
    print(
        f"cl_bench bench: device {device_name}, torch {torch.__version__}, CPU threads {threads} ({why}), "
        f"load average {load0 and ' '.join(f'{x:.2f}' for x in load0)}, bf16 peak {peak or '-'} TFLOP/s; "
        f"seconds = {'process CPU seconds (1 thread: immune to other load)' if b.basis == 'cpu' else 'wall seconds'}"
    )
    load_data(b)
    specs = specs_for(device, args)
    run_all(b, specs, set(args.phases.split(",")) if args.phases else None)
    goals = targets(b.rows, peak, [s.name for s in specs], b.n_train)
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else None
    print_summary(b.rows, goals, b.notes, cuda=device.type == "cuda")
    report = {
        "machine": {
            "device": device_name,
            "bf16_peak_tflops": peak,
            "torch": torch.__version__,
            "threads": threads,
            "threads_source": why,
            "load_average_start": load0,
            "load_average_end": load1,
            "seconds_basis": b.basis,
            "isolation": "in-process, CUDA peak reset per phase"
            if device.type == "cuda"
            else "forked child per phase, RSS high-water mark reset at phase start",
            "seconds": time.time() - started,
        },
        "data": b.data_source,
        "notes": b.notes,
        "rows": b.rows,
        "targets": goals,
    }
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwritten: {args.out} (load average at the end {load1 and ' '.join(f'{x:.2f}' for x in load1)})")
    return report

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
import sys
import time
from pathlib import Path

import torch

from .dispatch import run_phase
from .setup import CURRENT, REPO, Bench, ModelSpec, load_tasks
from .targets import device_peak_tflops, print_summary, targets


def smollm2_spec(device: torch.device, args) -> ModelSpec:
    """SmolLM2-135M-Instruct, the real model: every phase, with the side-by-side references (HF
    Trainer + PEFT, plain generate, lm-eval, the matmul ceiling) and the whole runs; on the CPU
    with 2 capture steps (not the paper's 8) and 2 training steps per variant, to stay within
    minutes per phase on one thread."""
    cpu = device.type != "cuda"
    return ModelSpec(
        "smollm2",
        rank=8,
        max_len=256,
        batch_size=16,
        grad_accum=1,
        train_steps=args.steps or (2 if cpu else 8),
        capture_steps=2 if cpu else 8,
        capture_batch_size=16,
        stages=(1, 3) if cpu else (1, 5),
        eval_examples=args.eval_examples,
        capture_max_tokens=None,
        # the phases with targets first: an interrupted bench keeps them (bench.json is saved per phase)
        phases=("load", "train", "eval", "runs", "merge", "bf16", "init", "gpip", "preset"),
        train_variants=("group", "pad", "reference", "hf_trainer"),
        eval_variants=("authors", "ours_count", "ours", "hf_generate", "lm_eval", "prefill"),
        gpip_limit=20,
        gpip_batches=(32,),
        run_train=args.run_train,
        run_eval=args.run_eval,
    )


def smollm2_available() -> str | None:
    """None when SmolLM2's GGUF file is installed, else why not (the rows are then skipped)."""
    from omegaconf import OmegaConf

    from ..data.gguf import gguf_source
    from ..infra.errors import CLBenchError
    from ..run.config import CONF_DIR

    try:
        gguf_source(OmegaConf.load(CONF_DIR / "model" / "smollm2.yaml"))
    except CLBenchError as exc:
        return str(exc)
    return None


def specs_for(device: torch.device, args) -> list[ModelSpec]:
    """The model specs of --model: tiny (every phase), llama3b (all phases on CUDA; a few layers,
    init/train/merge on the CPU), smollm2 (the real model, every phase and the whole runs)."""
    out = []
    if args.model in ("tiny", "both", "all"):
        out.append(ModelSpec("tiny", rank=8, max_len=256, train_steps=args.steps or 4))
    if args.model in ("llama3b", "both", "all"):
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
    return out + ([smollm2_spec(device, args)] if args.model in ("smollm2", "all") else [])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of `python -m cl_bench.bench` (argv None: sys.argv)."""
    parser = argparse.ArgumentParser(
        prog="python -m cl_bench.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        choices=("tiny", "llama3b", "smollm2", "both", "all"),
        default="all",
        help="both: tiny and llama3b; all: those and smollm2 (the real model, skipped with a note when its file is missing)",
    )
    parser.add_argument("--run-train", type=int, default=32, help="smollm2 whole runs: training examples per task")
    parser.add_argument("--run-eval", type=int, default=16, help="smollm2 whole runs: eval examples per task")
    parser.add_argument("--eval-examples", type=int, default=32, help="smollm2 eval phase: prompts per task (2 tasks)")
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
        "--phases",
        default=None,
        help="comma-separated subset of load,init,csweep,train,merge,eval,gpip,exact,bf16,runs,preset",
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


def run_all(b: Bench, specs: list[ModelSpec], only: set[str] | None, save=lambda: None) -> None:
    """Every phase of every spec (only those in `only` when given), printing each one's seconds;
    `save()` after each phase (the rows so far survive an interrupted bench)."""
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
            save()
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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what reruns it (bench.json's command)
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
    missing = smollm2_available() if any(s.name == "smollm2" for s in specs) else None
    if missing:
        b.notes.append(f"smollm2 rows skipped: {missing}")
        specs = [s for s in specs if s.name != "smollm2"]
    context = dict(args=args, b=b, why=why, device_name=device_name, peak=peak, load0=load0, started=started)
    save = lambda: write_report(**context, specs=specs, partial=True)  # noqa: E731
    run_all(b, specs, set(args.phases.split(",")) if args.phases else None, save)
    report = write_report(**context, specs=specs, partial=False)
    print(f"\nwritten: {args.out} (load average at the end {report['machine']['load_average_end']})")
    return report


def write_report(args, b: Bench, specs, why, device_name, peak, load0, started, partial: bool) -> dict:
    """bench.json (--out) from the rows so far: the machine with its load average at the start and
    now, the notes, the rows and the targets; prints the tables unless `partial`."""
    device, threads = b.device, b.threads
    goals = targets(b.rows, peak, [s.name for s in specs], b.n_train)
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else None
    if not partial:
        print_summary(b.rows, goals, b.notes, cuda=device.type == "cuda")
    report = {
        "partial": partial,
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
        "command": " ".join(["python -m cl_bench.bench", *args.argv]),
        "data": b.data_source,
        "data_root": b.data_root,
        "notes": b.notes,
        "rows": b.rows,
        "targets": goals,
    }
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    return report

"""`python -m cl_bench.bench`: what the data-driven inits cost, on this machine.

Two tables:
1. Per stage, for each method (default lora_ga and slice), the init cost (capture, SVD,
   total) next to the stage's training cost, from full runner runs with the cache off.
2. One stage-1 capture of the first task timed three ways: cache off, cold cache (capture
   + store) and warm cache (load), plus a whole-init cache hit.

Extra Hydra overrides for the runs go after `--`, e.g.
`python -m cl_bench.bench -- trainer.max_steps=20 lora.r=4`.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from .config import CONF_DIR


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def stage_costs(method_overrides: dict[str, list[str]], common: list[str], out: Path) -> list[dict]:
    """Run each method through the runner (cache off so every capture is computed) and collect
    the per-stage init/train seconds from results.json."""
    from .runner import run

    rows = []
    for label, extra in method_overrides.items():
        run_dir = out / label
        cfg = compose([*extra, *common, "cache.enabled=false"])
        results = run(cfg, run_dir)
        for stage in results["stages"]:
            init = stage["init"]
            secs = init.get("seconds", {})
            rows.append({
                "method": label,
                "stage": stage["stage"],
                "task": stage["task"],
                "previous_tasks": len(init.get("capture", {}).get("previous", [])),
                "capture_s": secs.get("capture"),
                "svd_s": secs.get("svd"),
                "init_s": stage["seconds"]["init"],
                "train_s": stage["seconds"]["train"],
                "projection": init.get("projection"),
            })
    return rows


def capture_cache_costs(common: list[str], cache_root: Path) -> list[dict]:
    """Stage-1 capture of the first task: cache off / cold / warm, and a whole-init hit."""
    from peft import LoraConfig, get_peft_model

    from .data import TrainingEncoder, prompt_format
    from .initializers.gradient import LoraGA
    from .models import load_model, resolve_device
    from .stage import StageContext, adapter_name, lora_scaling, stage_seed
    from .tasks import load_sequence

    cfg = compose(["initializer=lora_ga", *common])
    device = resolve_device(str(cfg.device))
    model, tokenizer = load_model(cfg.model, device, str(cfg.cache.dir), log=lambda s: None)
    encoder = TrainingEncoder(tokenizer, int(cfg.trainer.max_len), bool(cfg.trainer.mask_prompt), prompt_format(cfg.evaluation))
    task = load_sequence(cfg.sequence, cfg.data.get("root"), int(cfg.seed))[0]
    peft_model = get_peft_model(
        model,
        LoraConfig(r=int(cfg.lora.r), lora_alpha=float(cfg.lora.alpha), target_modules=list(cfg.lora.target_modules),
                   use_rslora=cfg.lora.scaling == "rslora", lora_dropout=0.0),
        adapter_name=adapter_name(1),
    )
    knobs = {k: cfg.initializer[k] for k in ("capture_steps", "capture_batch_size")}

    def ctx(cache_dir):
        return StageContext(
            stage=1, current=task, previous=[], rank=int(cfg.lora.r), alpha=float(cfg.lora.alpha),
            scaling=lora_scaling(cfg.lora.alpha, cfg.lora.r, cfg.lora.scaling), scaling_convention=cfg.lora.scaling,
            target_modules=list(cfg.lora.target_modules), device=device, seed=stage_seed(cfg.seed, 1),
            make_batches=lambda t, n, bs, seed: encoder.batches(t, n, bs, seed, device),
            cache_dir=cache_dir, log=lambda s: None, adapter=adapter_name(1),
        )

    # Warm-up (first-call allocations, lazy init) so the first timed case is not penalised.
    LoraGA(capture_steps=1, capture_batch_size=int(knobs["capture_batch_size"])).init(peft_model, ctx(None))
    rows = []
    cases = [
        ("cache off", LoraGA(**knobs), None),
        ("cold cache (capture + store)", LoraGA(**knobs), str(cache_root)),
        # another SVD knob: the init misses, the capture is loaded from the cache
        ("warm cache (capture loaded)", LoraGA(niter=5, **knobs), str(cache_root)),
        ("whole init from cache", LoraGA(**knobs), str(cache_root)),
    ]
    for label, init, cache_dir in cases:
        t0 = time.perf_counter()
        stats = init.init(peft_model, ctx(cache_dir)).stats
        total = time.perf_counter() - t0
        # on a whole-init hit the stored stats describe the original capture, not this call
        cap = {} if stats["cache"]["init"] == "hit" else stats.get("capture", {}).get("current", {})
        rows.append({
            "case": label,
            "capture_s": cap.get("seconds"),
            "capture_cache": cap.get("cache", "-"),
            "init_cache": stats["cache"]["init"],
            "init_total_s": total,
        })
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def print_table(rows: list[dict], title: str) -> None:
    if not rows:
        return
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    print(f"\n== {title} ==")
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(widths[c]) for c in cols))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequence", default="synthetic_conflict")
    parser.add_argument("--eval-limit", type=int, default=8, help="eval examples per task (eval cost is not measured)")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--skip-stages", action="store_true", help="only the capture/cache table")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    common = [f"sequence={args.sequence}", f"evaluation.limit={args.eval_limit}", "general_eval=none",
              "progress=false", *args.overrides]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cl_bench_bench_"))
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}, runs in {out}")
    rows = capture_cache_costs(common, out / "capture_cache")
    print_table(rows, "stage-1 capture of the first task: cache off / cold / warm")
    stage_rows = []
    if not args.skip_stages:
        methods = {"lora_ga": ["initializer=lora_ga"], "slice": ["initializer=slice"]}
        stage_rows = stage_costs(methods, common, out / "runs")
        print_table(stage_rows, "init vs training cost per stage (cache off)")
    (out / "bench.json").write_text(json.dumps({"capture_cache": rows, "stages": stage_rows}, indent=2))
    print(f"\nwritten: {out / 'bench.json'}")


if __name__ == "__main__":
    main()

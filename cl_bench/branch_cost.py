"""`python -m cl_bench.branch_cost`: how a branch-keeping merge's per-stage cost grows with its branches.

Runs the same T-task sequence with merge=absorb and merge=gainlora (the default pair; --merges)
through the runner and prints, per stage t = 1..T: CPU seconds of the whole stage (init,
begin_stage, training, end_stage, merge), of its training (and per optimizer step) and of its
evaluation row, the process's peak resident memory while training (and
its rise over the resident memory at the start of training), and the MB of LoRA factors and gates
the model holds (float32 bytes as stored). CPU time (time.process_time) rather than wall time, so
that a busy machine does not inflate it; run single-threaded (threads=1) for comparable figures.
Peak memory resets per stage through /proc/self/clear_refs (Linux; "-" elsewhere).

Extra Hydra overrides for every run go after `--`, e.g.
`python -m cl_bench.branch_cost -- trainer.max_steps=20 lora.r=4`.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
from pathlib import Path

from .run.config import CONF_DIR
from .lora.gating import BANK
from .run.runner import Runner

TASKS = "[sentiment,is_animal,parity,has_color,first_word]"  # five synthetic skills


def _status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        return True
    except OSError:
        return False


class MeasuredRunner(Runner):
    """The runner, recording per stage what its training and evaluation cost (see the module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.measured: dict[int, dict] = {}

    def train(self, peft_model, ctx, files):
        reset = _reset_peak()
        rss0, cpu0 = _status_kb("VmRSS"), time.process_time()
        summary = super().train(peft_model, ctx, files)
        cpu = time.process_time() - cpu0
        peak = _status_kb("VmHWM") if reset else None
        lora = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "lora_" in n)
        gates = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if f"{BANK}." in n)
        adapters = len(next(m for m in peft_model.modules() if hasattr(m, "lora_A")).lora_A)
        self.measured[ctx.stage] = {
            "adapters": adapters, "train_cpu_s": cpu, "s_per_step": cpu / max(1, summary["steps"]),
            "peak_rss_mb": peak / 1024 if peak else None,
            "train_rise_mb": (peak - rss0) / 1024 if peak and rss0 else None,
            "lora_mb": lora / 2**20, "gate_mb": gates / 2**20,
        }
        return summary

    def train_stage(self, stage, files):
        cpu0 = time.process_time()  # the whole stage: init, begin_stage, training, end_stage, merge
        record = super().train_stage(stage, files)
        self.measured.setdefault(stage, {})["stage_cpu_s"] = time.process_time() - cpu0
        return record

    def evaluate_row(self, stage: int) -> None:
        cpu0 = time.process_time()
        super().evaluate_row(stage)
        if stage:
            self.measured.setdefault(stage, {})["eval_cpu_s"] = time.process_time() - cpu0


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def measure(merges: list[str], common: list[str], out: Path) -> list[dict]:
    rows = []
    for merge in merges:
        runner = MeasuredRunner(compose([f"merge={merge}", *common]), out / merge)
        runner.run()
        for stage, m in sorted(runner.measured.items()):
            rows.append({"merge": merge, "stage": stage, **m})
    return rows


def print_table(rows: list[dict]) -> None:
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(fmt(r[c]).ljust(widths[c]) for c in cols))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merges", default="absorb,gainlora", help="comma-separated merge choices")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    common = ["sequence=synthetic", f"sequence.tasks={TASKS}", "sequence.n_train=64", "sequence.n_eval=16",
              "trainer.max_steps=20", "general_eval=none", "progress=false", "threads=1", *args.overrides]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cl_bench_branch_cost_"))
    rows = measure(args.merges.split(","), common, out)
    cols = ["merge", "stage", "adapters", "stage_cpu_s", "train_cpu_s", "s_per_step", "eval_cpu_s", "peak_rss_mb", "train_rise_mb",
            "lora_mb", "gate_mb"]
    print("\n== per-stage cost with the number of branches ==")
    print_table([{c: r.get(c) for c in cols} for r in rows])
    (out / "branch_cost.json").write_text(json.dumps(rows, indent=2))
    print(f"\nwritten: {out / 'branch_cost.json'}")


if __name__ == "__main__":
    main()

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
import tempfile
import time
from pathlib import Path

from .infra.memory import peak_mb, reset_peak, rss_mb
from .lora.gating import BANK
from .run.config import CONF_DIR
from .run.observers import Observer

TASKS = "[sentiment,is_animal,parity,has_color,first_word]"  # five synthetic skills


def _param_mb(model, part: str) -> float:
    """MB of the model's parameters whose name holds `part` (bytes as stored)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if part in n) / 2**20


class StageCost(Observer):
    """Per trained stage, what it cost (see the module doc): `measured[stage]` = {adapters,
    stage_cpu_s, train_cpu_s, s_per_step, eval_cpu_s, peak_rss_mb, train_rise_mb, lora_mb, gate_mb}."""

    def __init__(self):
        self.measured: dict[int, dict] = {}
        self._cpu0: dict[str, float] = {}

    def before_stage(self, stage, task):
        self._cpu0["stage"] = time.process_time()  # the whole stage: init, begin_stage, training, end_stage, merge

    def before_training(self, stage, task, total_steps, start_step):
        self._reset = reset_peak()
        self._rss0 = rss_mb()
        self._cpu0["train"] = time.process_time()

    def after_training(self, stage, summary, model):
        cpu = time.process_time() - self._cpu0["train"]
        peak = peak_mb()["rss_peak_mb"] if self._reset else None
        adapters = len(next(m for m in model.modules() if hasattr(m, "lora_A")).lora_A)
        self.measured.setdefault(stage, {}).update(
            {
                "adapters": adapters,
                "train_cpu_s": cpu,
                "s_per_step": cpu / max(1, summary["steps"]),
                "peak_rss_mb": peak,
                "train_rise_mb": peak - self._rss0 if peak and self._rss0 else None,
                "lora_mb": _param_mb(model, "lora_"),
                "gate_mb": _param_mb(model, f"{BANK}."),
            }
        )

    def after_stage_trained(self, stage, record):
        self.measured.setdefault(stage, {})["stage_cpu_s"] = time.process_time() - self._cpu0["stage"]

    def before_eval_row(self, stage, n_tasks):
        self._cpu0["eval"] = time.process_time()

    def after_eval_row(self, stage):
        if stage:
            self.measured.setdefault(stage, {})["eval_cpu_s"] = time.process_time() - self._cpu0["eval"]

    def after_general(self, stage, result):  # GP/IP, where measured, count as the row's evaluation
        self.after_eval_row(stage)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def measure(merges: list[str], common: list[str], out: Path) -> list[dict]:
    """One run per merge (run dir out/<merge>), with a StageCost subscribed; its rows per stage."""
    from .run.runner import run

    rows = []
    for merge in merges:
        cost = StageCost()
        run(compose([f"merge={merge}", *common]), out / merge, observers=[cost])
        for stage, m in sorted(cost.measured.items()):
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
    common = [
        "sequence=synthetic",
        f"sequence.tasks={TASKS}",
        "sequence.n_train=64",
        "sequence.n_eval=16",
        "trainer.max_steps=20",
        "general_eval=none",
        "progress=false",
        "threads=1",
        *args.overrides,
    ]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cl_bench_branch_cost_"))
    rows = measure(args.merges.split(","), common, out)
    cols = [
        "merge",
        "stage",
        "adapters",
        "stage_cpu_s",
        "train_cpu_s",
        "s_per_step",
        "eval_cpu_s",
        "peak_rss_mb",
        "train_rise_mb",
        "lora_mb",
        "gate_mb",
    ]
    print("\n== per-stage cost with the number of branches ==")
    print_table([{c: r.get(c) for c in cols} for r in rows])
    (out / "branch_cost.json").write_text(json.dumps(rows, indent=2))
    print(f"\nwritten: {out / 'branch_cost.json'}")


if __name__ == "__main__":
    main()

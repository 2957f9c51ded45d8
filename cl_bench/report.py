"""`python -m cl_bench.report <run dirs or sweep dirs> [--out DIR]`: one table from many runs.

Finds every results.json below the given folders, makes one row per run (sequence, method,
the overrides that distinguish it, seed, metrics) and prints mean ± std over seeds per
(sequence, method, knobs) group. Writes runs.csv and summary.csv/summary.md when --out is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

METRICS = ["AP", "FP", "Fgt", "BWT", "FWT", "FR", "Acc", "AAA", "GP", "IP"]


def find_results(paths: list[str]) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if p.is_file() and p.name == "results.json":
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob("results.json")))
    return found


def run_row(path: Path) -> dict:
    res = json.loads(path.read_text())
    cfg = res.get("config", {})
    init = dict(cfg.get("initializer", {}))
    method = str(init.pop("_target_", "?")).rsplit(".", 1)[-1]
    knobs = {k: v for k, v in sorted(init.items()) if not isinstance(v, (dict, list))}
    lora = cfg.get("lora", {})
    row = {
        "run": str(path.parent), "sequence": res.get("sequence"), "method": method, "knobs": knobs,
        "rank": lora.get("r"), "alpha": lora.get("alpha"), "seed": cfg.get("seed"), "complete": res.get("complete"),
    }
    row.update({m: (res.get("metrics") or {}).get(m) for m in METRICS})
    return row


def varying_knobs(runs: pd.DataFrame) -> pd.Series:
    """Per run, only the initializer knobs that differ between runs of the same method, so the
    table says 'c=0.5' rather than every default."""
    out = pd.Series("", index=runs.index)
    for _, group in runs.groupby("method"):
        keys = sorted({k for d in group["knobs"] for k in d})
        varying = [k for k in keys if len({repr(d.get(k)) for d in group["knobs"]}) > 1]
        for idx, d in group["knobs"].items():
            out[idx] = ",".join(f"{k}={d.get(k)}" for k in varying)
    return out


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    keys = ["sequence", "method", "knobs", "rank", "alpha"]
    done = runs[runs["complete"] == True]  # noqa: E712 - pandas boolean mask
    grouped = done.groupby(keys, dropna=False)[METRICS]
    mean, std = grouped.mean(), grouped.std()
    out = mean.copy()
    for m in METRICS:
        out[m] = [
            "n/a" if pd.isna(mu) else (f"{mu:.2f}" if pd.isna(sd) else f"{mu:.2f} ± {sd:.2f}")
            for mu, sd in zip(mean[m], std[m])
        ]
    out["seeds"] = grouped.size()
    return out.reset_index()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cl_bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run dirs, sweep dirs or results.json files")
    parser.add_argument("--out", help="folder for runs.csv, summary.csv and summary.md")
    args = parser.parse_args(argv)
    files = find_results(args.paths)
    if not files:
        print(f"cl_bench.report: error: no results.json below {', '.join(args.paths)}", file=sys.stderr)
        return 2
    runs = pd.DataFrame([run_row(f) for f in files])
    runs["knobs"] = varying_knobs(runs)
    summary = summarize(runs)
    print(summary.to_string(index=False))
    incomplete = int((runs["complete"] != True).sum())  # noqa: E712
    if incomplete:
        print(f"({incomplete} incomplete run(s) left out)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        runs.to_csv(out / "runs.csv", index=False)
        summary.to_csv(out / "summary.csv", index=False)
        (out / "summary.md").write_text(summary.to_markdown(index=False) if _has_tabulate() else summary.to_string(index=False))
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401  (pandas.to_markdown needs it)
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())

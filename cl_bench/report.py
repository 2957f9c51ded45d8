"""`python -m cl_bench.report <run dirs or sweep dirs> [--out DIR]`: one table from many runs.

Finds every results.json below the given folders and groups the runs into experiments: two runs
belong to the same experiment when their resolved configs agree on every key except the seed,
paths and keys that do not change results (progress, verbose, logger, cache, threads). Each row
is one experiment: sequence, method, the keys that set it apart (`setting`), the number of
distinct seeds n, and mean ± std over seeds. Reruns with the same seed are duplicates: listed,
and counted once (their mean). Writes runs.csv and summary.csv/summary.md when --out is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from .run_dir import NON_RESULT_KEYS

METRICS = ["AP", "FP", "Fgt", "BWT", "FWT", "FR", "Acc", "AAA", "GP", "IP"]
SEED_KEY = "seed"
PATH_KEYS = ("data.root", "cache.dir")
ABSENT = "<absent>"
# Subtrees whose keys come with the choice of sequence or method (a SLICE knob is absent from a
# vanilla run): shown in `setting` only when they differ between runs of one sequence and method.
CHOICE_SUBTREES = ("sequence.", "initializer.")


def find_results(paths: list[str]) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if p.is_file() and p.name == "results.json":
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob("results.json")))
    return found


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": leaf}; lists are leaves (a task list is one value)."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _ignored(key: str) -> bool:
    return key == SEED_KEY or key in PATH_KEYS or key.split(".")[0] in NON_RESULT_KEYS


def method_of(config: dict) -> str:
    return str((config.get("initializer") or {}).get("_target_", "?")).rsplit(".", 1)[-1]


def load_runs(files: list[Path]) -> pd.DataFrame:
    """One row per results.json: run, sequence, method, seed, complete, metrics, and `config`
    (the flattened resolved config, for grouping)."""
    rows = []
    for path in files:
        res = json.loads(path.read_text())
        cfg = res.get("config", {})
        row = {"run": str(path.parent), "sequence": res.get("sequence"), "method": method_of(cfg),
               "seed": cfg.get(SEED_KEY), "complete": bool(res.get("complete")), "config": flatten(cfg)}
        row.update({m: (res.get("metrics") or {}).get(m) for m in METRICS})
        rows.append(row)
    return pd.DataFrame(rows)


def _value(config: dict, key: str) -> str:
    """A hashable, readable form of one config value (absent keys included)."""
    if key not in config:
        return ABSENT
    v = config[key]
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)


def experiment_keys(runs: pd.DataFrame) -> list[str]:
    """Config keys whose value differs between at least two runs (seed, paths and non-result
    keys excluded): together they say which experiment a run belongs to."""
    keys = sorted({k for cfg in runs["config"] for k in cfg if not _ignored(k)})
    return [k for k in keys if len({_value(cfg, k) for cfg in runs["config"]}) > 1]


def shown_keys(runs: pd.DataFrame, keys: list[str]) -> list[str]:
    """The experiment keys worth a column: not the sequence name or method themselves, and keys of
    the sequence/initializer subtrees only when they vary within one (sequence, method)."""
    out = []
    for k in keys:
        if k in ("sequence.name", "initializer._target_"):
            continue
        if k.startswith(CHOICE_SUBTREES):
            within = runs.groupby(["sequence", "method"])["config"].agg(lambda cs: len({_value(c, k) for c in cs}))
            if within.max() <= 1:
                continue
        out.append(k)
    return out


def label_experiments(runs: pd.DataFrame) -> pd.DataFrame:
    """Adds `experiment` (a key equal for runs of one experiment) and `setting` (readable k=v)."""
    runs = runs.copy()
    keys = experiment_keys(runs)
    shown = shown_keys(runs, keys)
    runs["experiment"] = [tuple(_value(c, k) for k in keys) for c in runs["config"]]
    runs["setting"] = [",".join(f"{k}={_value(c, k)}" for k in shown if k in c) for c in runs["config"]]
    return runs


def duplicates(runs: pd.DataFrame) -> list[str]:
    """One line per (experiment, seed) that more than one complete run holds."""
    lines = []
    done = runs[runs["complete"]]
    for (_, seed), group in done.groupby(["experiment", "seed"], dropna=False, sort=False):
        if len(group) > 1:
            first = group.iloc[0]
            what = " ".join(x for x in (first["sequence"], first["method"], first["setting"]) if x)
            lines.append(f"duplicate: seed {seed} of {what} in {len(group)} runs ({', '.join(group['run'])}); counted once (their mean)")
    return lines


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per experiment: n distinct seeds, mean ± std over seeds (duplicates averaged first)."""
    done = runs[runs["complete"]]
    per_seed = done.groupby(["experiment", "seed"], dropna=False, sort=False)
    seeds = per_seed[METRICS].mean().reset_index()
    labels = done.groupby("experiment", sort=False)[["sequence", "method", "setting"]].first()
    grouped = seeds.groupby("experiment", sort=False)
    mean, std = grouped[METRICS].mean(), grouped[METRICS].std()
    out = labels.loc[mean.index].copy()
    out["n"] = grouped.size()
    out["seeds"] = grouped["seed"].agg(lambda s: ",".join(str(x) for x in sorted(s)))
    for m in METRICS:
        out[m] = [
            "n/a" if pd.isna(mu) else (f"{mu:.2f}" if pd.isna(sd) else f"{mu:.2f} ± {sd:.2f}")
            for mu, sd in zip(mean[m], std[m])
        ]
    return out.sort_values(["sequence", "method", "setting"]).reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cl_bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run dirs, sweep dirs or results.json files")
    parser.add_argument("--out", help="folder for runs.csv, summary.csv and summary.md")
    args = parser.parse_args(argv)
    files = find_results(args.paths)
    if not files:
        print(f"cl_bench.report: error: no results.json below {', '.join(args.paths)}", file=sys.stderr)
        return 2
    runs = label_experiments(load_runs(files))
    summary = summarize(runs)
    print(summary.to_string(index=False) if len(summary) else "(no complete run)")
    for line in duplicates(runs):
        print(line)
    incomplete = int((~runs["complete"]).sum())
    if incomplete:
        print(f"({incomplete} incomplete run(s) left out)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        runs.drop(columns=["config", "experiment"]).to_csv(out / "runs.csv", index=False)
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

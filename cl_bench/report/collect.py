"""`python -m cl_bench.report <run dirs or sweep dirs> [--baseline METHOD] [--out DIR]`: tables,
paired tests and figures from many runs.

Reading. Every results.json below the given folders is one run; a Hydra job dir without one, and
a job of a sweep (multirun.yaml) that has no dir yet, are listed too. Each run has a state:
complete, pending (requeued after preemption/timeout, or not started), incomplete (running, or
killed), interrupted, failed, missing (job dir without results.json) or unreadable. Only complete
runs enter the numbers; all others are listed with their status, never dropped silently.

Grouping. Two runs belong to the same experiment when their resolved configs agree on
every key except the seed, paths and keys that do not change results (progress, verbose, logger,
cache, threads). An experiment's numbers are mean ± sample std over its distinct seeds; reruns of
one seed are duplicates, listed and counted once (their mean). Experiments are arranged in blocks
(the sequence and the other non-method keys that vary, e.g. lora.alpha) and rows (the method:
initializer, plus regularizer and merge when not the defaults, plus the method knobs that vary,
e.g. c). Runs that claim to be the same cell (same sequence, method and command-line overrides
apart from the seed) but whose configs differ are flagged: different code defaults or mixed sweeps.

Layout (SLICE paper, Table 1). With --baseline METHOD the baseline row of each block is absolute
and every other row is Δ = mean(method) − mean(baseline), ± the method's std over seeds; the paired
tests (cl_bench/report/stats.py) compare method and baseline seed by seed.

The command itself (files written, options) is cl_bench/report/cli.py.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..infra.config_keys import result_changing
from ..infra.errors import ConfigError
from .labels import (
    METHOD_GROUPS,
    MODE_KEY,
    block_label,
    is_method_key,
    method_label,
    method_of,
    natural_key,
    short_names,
)
from .paper_names import METRICS_AS, forgetting_rate_up_to_learning

# FWT_scratch: PS-LoRA's FWT against the independent run of the same seed (`scratch_fwt`), shown
# only when a block holds mode=independent runs. FR_upto: PS-LoRA's FR, from each run's matrix
# (paper_names.forgetting_rate_up_to_learning); shown only under --metrics-as (NAMED_ONLY).
METRICS = ["AP", "FP", "Fgt", "BWT", "FWT", "FR", "Acc", "AAA", "GP", "IP", "FWT_scratch", "FR_upto"]
NAMED_ONLY = ("FR_upto",)
PAPER_METRICS = ["AP", "FP", "Fgt", "GP", "IP"]  # SLICE Tables 1-2
SEED_KEY = "seed"
ABSENT = "<absent>"
# Subtrees whose keys come with the choice of sequence or method (a SLICE knob is absent from a
# vanilla run): shown only when they differ between runs of one sequence and method.
CHOICE_SUBTREES = ("sequence.",) + tuple(f"{g}." for g in METHOD_GROUPS)
STATES = ("complete", "pending", "incomplete", "interrupted", "failed", "missing", "unreadable")
SKIP_DIRS = {"stages", "predictions", ".submitit", "wandb", "general_eval", ".hydra", "figures"}


# ---- reading ------------------------------------------------------------------------------------
@dataclass
class Found:
    """What one walk over the given folders found (find_runs)."""

    results: list[Path] = field(default_factory=list)  # results.json files
    no_results: list[Path] = field(default_factory=list)  # Hydra job dirs without results.json
    sweeps: list[Path] = field(default_factory=list)  # dirs holding a multirun.yaml


def find_runs(paths: list[str]) -> Found:
    """One walk over the given folders (run dirs' stage and prediction folders are skipped)."""
    found = Found()
    for p in map(Path, paths):
        if p.is_file() and p.name == "results.json":
            found.results.append(p)
            continue
        for dirpath, dirnames, filenames in os.walk(p):
            d = Path(dirpath)
            if "results.json" in filenames:
                found.results.append(d / "results.json")
            elif ".hydra" in dirnames:
                found.no_results.append(d)
            if "multirun.yaml" in filenames:
                found.sweeps.append(d)
            dirnames[:] = sorted(x for x in dirnames if x not in SKIP_DIRS)
    found.results = sorted(set(found.results))
    return found


def find_results(paths: list[str]) -> list[Path]:
    """The results.json files below `paths`, sorted."""
    return find_runs(paths).results


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": leaf}; lists are leaves (a task list is one value)."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _ignored(key: str, config: dict | None = None) -> bool:
    """The seed, and every key that cannot change results (infra/config_keys: one classification
    for the report's grouping and a resume's config check)."""
    return key == SEED_KEY or not result_changing(key, config)


def run_state(results: dict) -> str:
    """complete | pending | incomplete | interrupted | failed, from results.json's flags."""
    if results.get("complete"):
        return "complete"
    status = str(results.get("status") or "")
    if "Requeued" in status or status.startswith("requeued"):
        return "pending"  # cl_bench.infra.jobs: the job checkpointed and was requeued; it will resume
    if status.startswith("failed"):
        return "failed"
    if status.startswith("interrupted"):
        return "interrupted"
    return "incomplete"  # "running": still running, or killed without a trace


def _overrides(run_dir: Path) -> list[str]:
    """The job's command-line overrides (Hydra's .hydra/overrides.yaml), [] when absent."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    import yaml

    try:
        return [str(x) for x in (yaml.safe_load(path.read_text()) or [])]
    except yaml.YAMLError:
        return []


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _last_log_line(run_dir: Path) -> str:
    log = run_dir / "cl_bench.log"
    if not log.exists():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][-200:] if lines else ""


def _run_row(path: Path) -> dict[str, Any]:
    run_dir = path.parent
    overrides = _overrides(run_dir)
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return {
            "run": str(run_dir),
            "state": "unreadable",
            "status": f"results.json unreadable: {exc}",
            "config": {},
            "overrides": overrides,
            "results": {},
        }
    cfg = res.get("config") or {}
    if cfg:  # runs from before `mode` existed are sequential runs (one experiment with the new ones)
        cfg = {MODE_KEY: "sequential", **cfg}
    tasks = res.get("tasks") or []
    stages = res.get("stages") or []
    commit = ((res.get("provenance") or {}).get("cl_bench") or {}).get("commit")
    row = {
        "run": str(run_dir),
        "sequence": res.get("sequence"),
        "method": method_of(cfg),
        "seed": cfg.get(SEED_KEY),
        "state": run_state(res),
        "status": str(res.get("status") or ("complete" if res.get("complete") else "")),
        "stages_done": f"{len(stages)}/{len(tasks)}" if tasks else "",
        "commit": commit,
        "config": flatten(cfg),
        "overrides": overrides,
        "results": res,
    }
    row.update({m: (res.get("metrics") or {}).get(m) for m in METRICS})
    row["FR_upto"] = _fr_upto(res, cfg)
    return row


def _fr_upto(res: dict, cfg: dict) -> float | None:
    """PS-LoRA's FR from the run's matrix (sequential runs; a reference mode's FR, 0 by
    construction, otherwise); None without a complete matrix."""
    if cfg.get(MODE_KEY, "sequential") != "sequential":
        return (res.get("metrics") or {}).get("FR")
    matrix = res.get("matrix")
    try:
        return forgetting_rate_up_to_learning(matrix) if matrix else None
    except ValueError:  # not T+1 rows of T scores
        return None


def expected_jobs(sweep_dir: Path) -> int | None:
    """How many jobs a sweep launches (product of the sweep axes in its multirun.yaml, command-line
    sweeps included, as Hydra's basic sweeper does); None when it cannot tell (other sweepers)."""
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(sweep_dir / "multirun.yaml")
        sweeper = OmegaConf.select(cfg, "hydra.sweeper", default=None)
        if sweeper is None or "basic_sweeper" not in str(sweeper.get("_target_", "")):
            return None
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = OmegaConf.to_container(sweeper.get("params") or {}, resolve=False)
        args = [f"{k}={v}" for k, v in params.items()] + list(
            OmegaConf.select(cfg, "hydra.overrides.task", default=[]) or []
        )
        axes: dict[str, int] = {}  # later overrides of one key replace earlier ones (BasicSweeper)
        for o in OverridesParser.create().parse_overrides(args):
            axes[o.get_key_element()] = len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
        return int(np.prod(list(axes.values()))) if axes else 1
    except Exception:  # a malformed or foreign multirun.yaml: say nothing rather than guess
        return None


def _numbered_jobs(sweep_dir: Path) -> bool:
    """Whether the sweep names its job dirs by job number (Hydra's default subdir), so that job k's
    dir is <sweep>/k; a sweep whose multirun.yaml cannot be read counts as numbered."""
    from omegaconf import OmegaConf

    try:
        sweep = OmegaConf.to_container(OmegaConf.load(sweep_dir / "multirun.yaml").hydra.sweep, resolve=False)
    except Exception:  # a malformed multirun.yaml: as expected_jobs, assume the default
        return True
    return str(sweep.get("subdir", "${hydra.job.num}")).replace(" ", "") in ("${hydra.job.num}", "${hydra:job.num}")


def load_runs(files: list[Path], progress: bool | None = None) -> pd.DataFrame:
    """One row per results.json: run, sequence, method, seed, state, status, stages_done,
    metrics, `config` (the flattened resolved config), `overrides` and `results` (the JSON)."""
    from tqdm.auto import tqdm

    rows = [_run_row(p) for p in tqdm(files, desc="reading runs", unit="run", disable=_no_bar(progress), leave=False)]
    runs = pd.DataFrame(
        rows,
        columns=list(
            dict.fromkeys(
                [
                    "run",
                    "sequence",
                    "method",
                    "seed",
                    "state",
                    "status",
                    "stages_done",
                    "commit",
                    *METRICS,
                    "config",
                    "overrides",
                    "results",
                ]
            )
        ),
    )
    runs["complete"] = runs["state"] == "complete"
    return runs


def not_started_rows(found: Found) -> list[dict[str, Any]]:
    """Rows for job dirs without results.json and for jobs a sweep has not started yet."""
    rows = []
    blank = {
        "sequence": None,
        "method": None,
        "seed": None,
        "stages_done": "",
        "commit": None,
        "config": {},
        "results": {},
    }
    for d in found.no_results:
        last = _last_log_line(d)
        rows.append(
            {
                **blank,
                "run": str(d),
                "state": "missing",
                "overrides": _overrides(d),
                "status": "no results.json: failed before its first save, or starting"
                + (f" (log: {last})" if last else ""),
            }
        )
    have = {Path(r).parent for r in found.results} | set(found.no_results)
    for sweep in found.sweeps:
        n = expected_jobs(sweep)
        if n is None:
            continue
        if not _numbered_jobs(sweep):  # job dirs named by their overrides: only the count can be compared
            started = sum(1 for d in have if sweep in d.parents)
            if started < n:
                rows.append(
                    {
                        **blank,
                        "run": str(sweep),
                        "state": "pending",
                        "overrides": [],
                        "status": f"{n - started} of the {n} jobs of its last sweep command have no run dir yet",
                    }
                )
            continue
        for k in range(n):
            if (sweep / str(k)) not in have and not (sweep / str(k) / "results.json").exists():
                rows.append(
                    {
                        **blank,
                        "run": str(sweep / str(k)),
                        "state": "pending",
                        "overrides": [],
                        "status": f"job {k} of {n} has no run dir yet (not started)",
                    }
                )
    return rows


def _no_bar(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # None: a bar only on a terminal


# ---- grouping -----------------------------------------------------------------------------------
def _value(config: dict, key: str) -> str:
    """A hashable, readable form of one config value (absent keys included)."""
    if key not in config:
        return ABSENT
    v = config[key]
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)


def experiment_keys(runs: pd.DataFrame) -> list[str]:
    """Config keys whose value differs between at least two runs (seed, paths and non-result
    keys excluded): together they say which experiment a run belongs to."""
    keys = sorted({k for cfg in runs["config"] for k in cfg if not _ignored(k, cfg)})
    return [k for k in keys if len({_value(cfg, k) for cfg in runs["config"]}) > 1]


def shown_keys(runs: pd.DataFrame, keys: list[str]) -> list[str]:
    """The experiment keys worth a column: not the sequence name or plug-in classes themselves, and
    keys of the sequence/method subtrees only when they vary within one (sequence, method)."""
    out = []
    for k in keys:
        if k in ("sequence.name", MODE_KEY) or (k.endswith("._target_") and is_method_key(k)):
            continue
        if k.startswith(CHOICE_SUBTREES):
            within = runs.groupby(["sequence", "method"], dropna=False)["config"].agg(
                lambda cs, k=k: len({_value(c, k) for c in cs})
            )
            if within.max() <= 1:
                continue
        out.append(k)
    return out


def _choice(overrides: list[str]) -> str:
    for group in ("experiment/method", "initializer"):
        for o in overrides:
            if _override_key(o) == group:
                return o.split("=", 1)[1]
    return ""


def label_experiments(runs: pd.DataFrame) -> pd.DataFrame:
    """Adds `experiment` (a key equal for runs of one experiment) and its number `exp_id`, `setting` (readable k=v of
    the shown keys), `block` / `block_key` (sequence + non-method shown keys), `label` (method +
    method knobs), `knobs` (dict of the shown keys) and `choice` (the Hydra method choice)."""
    runs = runs.copy()
    with_config = runs[runs["config"].map(bool)]  # runs without results.json have no config to compare
    keys = experiment_keys(with_config) if len(with_config) else []
    shown = shown_keys(with_config, keys)
    short = short_names([k for k in shown if is_method_key(k)])
    runs["experiment"] = [tuple(_value(c, k) for k in keys) for c in runs["config"]]
    runs["exp_id"] = pd.factorize(runs["experiment"])[0]
    runs["setting"] = [",".join(f"{k}={_value(c, k)}" for k in shown if k in c) for c in runs["config"]]
    runs["knobs"] = [{k: _value(c, k) for k in shown if k in c} for c in runs["config"]]
    runs["block_key"] = [tuple(_value(c, k) for k in keys if not is_method_key(k)) for c in runs["config"]]
    runs["block"] = [
        block_label(seq, kn) if c else "" for seq, kn, c in zip(runs["sequence"], runs["knobs"], runs["config"])
    ]
    runs["label"] = [
        method_label(m, kn, short) if c else "" for m, kn, c in zip(runs["method"], runs["knobs"], runs["config"])
    ]
    runs["choice"] = [_choice(o) for o in runs["overrides"]]
    return runs


def duplicates(runs: pd.DataFrame) -> list[str]:
    """One line per (experiment, seed) that more than one complete run holds."""
    lines = []
    done = runs[runs["complete"]]
    for (_, seed), group in done.groupby(["exp_id", "seed"], dropna=False, sort=False):
        if len(group) > 1:
            first = group.iloc[0]
            what = " ".join(x for x in (first["sequence"], first["method"], first["setting"]) if x)
            lines.append(
                f"duplicate: seed {seed} of {what} in {len(group)} runs ({', '.join(group['run'])}); counted once (their mean)"
            )
    return lines


def unexpected_differences(runs: pd.DataFrame) -> list[str]:
    """Runs that should be one cell of a sweep (same sequence, method and command-line overrides,
    the seed aside) but whose resolved configs differ: one line per such group, naming the keys.
    Method knobs (initializer/regularizer/merge) are the method's own and are not flagged."""
    lines = []
    readable = runs[runs["config"].map(bool)]
    ident = [
        (seq, method, tuple(sorted(o for o in ov if not _ignored(_override_key(o), cfg))))
        for seq, method, ov, cfg in zip(
            readable["sequence"], readable["method"], readable["overrides"], readable["config"]
        )
    ]
    for key, group in readable.groupby(pd.Series(ident, index=readable.index), sort=False):
        if len(group) < 2:
            continue
        keys = sorted({k for c in group["config"] for k in c if not _ignored(k, c) and not is_method_key(k)})
        differing = []
        for k in keys:
            counts = pd.Series([_value(c, k) for c in group["config"]]).value_counts()
            if len(counts) > 1:
                differing.append(f"{k} (" + ", ".join(f"{v}: {n} run{'s' * (n > 1)}" for v, n in counts.items()) + ")")
        if differing:
            seq, method, ov = key
            named = f"overrides [{' '.join(ov)}]" if ov else "no recorded overrides"
            lines.append(
                f"unexpected: runs of {seq} {method} with {named} differ in {'; '.join(differing)}; "
                "kept apart (different code defaults, or mixed sweeps?)"
            )
    commits = runs["commit"].dropna().value_counts() if "commit" in runs else pd.Series(dtype=int)
    if len(commits) > 1:
        lines.append(
            "note: runs come from "
            + str(len(commits))
            + " cl_bench commits: "
            + ", ".join(f"{c[:10]} ({n} runs)" for c, n in commits.items())
        )
    return lines


# ---- numbers ------------------------------------------------------------------------------------
def _learned(results: dict, i: int) -> float | None:
    """R[i, i] (1-based task i) of a run's matrix, None when missing."""
    m = results.get("matrix") or []
    return m[i][i - 1] if i < len(m) and i - 1 < len(m[i]) else None


def scratch_fwt(runs: pd.DataFrame) -> pd.Series:
    """PS-LoRA's forward transfer (App. A.2): FWT = 1/(T−1) Σ_{i≥2} (a_{i,i} − a_scratch,i), where
    a_scratch,i is task i trained from the base model: R[i, i] of the complete `mode=independent` run
    of the same block, seed and task list. Per complete sequential run; NaN where there is no such
    run, a cell is missing, or T < 2. The paper prints a_{i,i−1}, which would compare task i before and
    after training it; its Table 2 values (near 0) fit a_{i,i}, which is what is computed here."""
    out = pd.Series(np.nan, index=runs.index, dtype=float)
    done = runs[runs["complete"]]
    mode = done["config"].map(lambda c: c.get(MODE_KEY, "sequential"))
    scratch = {
        (r["block_key"], str(r["seed"]), tuple(r["results"].get("tasks") or [])): r["results"]
        for _, r in done[mode == "independent"].iterrows()
    }
    for idx, r in done[mode == "sequential"].iterrows():
        tasks = tuple(r["results"].get("tasks") or [])
        ref = scratch.get((r["block_key"], str(r["seed"]), tasks))
        if ref is None or len(tasks) < 2:
            continue
        pairs = [(_learned(r["results"], i), _learned(ref, i)) for i in range(2, len(tasks) + 1)]
        if all(a is not None and b is not None for a, b in pairs):
            out[idx] = float(np.mean([a - b for a, b in pairs]))
    return out


def per_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (experiment, seed) of the complete runs; duplicates averaged."""
    done = runs[runs["complete"]]
    if done.empty:
        return pd.DataFrame(columns=["exp_id", "seed", *METRICS])
    values = done[["exp_id", "seed", *METRICS]].copy()
    values[METRICS] = values[METRICS].apply(pd.to_numeric, errors="coerce")
    return values.groupby(["exp_id", "seed"], dropna=False, sort=False)[METRICS].mean().reset_index()


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per experiment of complete runs: labels, n (distinct seeds), seeds, and per metric
    the mean `M` and sample std `M_std` (ddof 1; NaN for n = 1) over seeds."""
    seeds = per_seed(runs)
    cols = ["exp_id", "block_key", "block", "sequence", "method", "label", "choice", "setting", "knobs", "n", "seeds"]
    if seeds.empty:
        return pd.DataFrame(columns=cols + METRICS + [f"{m}_std" for m in METRICS])
    done = runs[runs["complete"]]
    labels = done.groupby("exp_id", sort=False)[
        ["block_key", "block", "sequence", "method", "label", "choice", "setting", "knobs"]
    ].first()
    grouped = seeds.groupby("exp_id", sort=False)
    out = labels.loc[list(grouped.groups)].copy()
    out["n"] = grouped.size()
    out["seeds"] = grouped["seed"].agg(lambda s: ",".join(str(x) for x in sorted(s, key=str)))
    mean, std = grouped[METRICS].mean(), grouped[METRICS].std(ddof=1)
    for m in METRICS:
        out[m] = mean[m]
        out[f"{m}_std"] = std[m]
    out = out.reset_index()
    return out.sort_values(["block", "label"], key=lambda s: s.map(natural_key)).reset_index(drop=True)


def _norm(s: Any) -> str:
    return re.sub(r"[^a-z0-9]", "", str(s).lower())


def mark_baseline(experiments: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """Adds `role` (baseline | delta | absolute) and, per metric, `M_delta` = mean − the block's
    baseline mean (NaN for baseline and absolute rows). `baseline` matches a method name, a row
    label or the Hydra method choice, ignoring case and punctuation ("lora_ga" = "LoraGA").
    Raises ConfigError when it matches nothing, or more than one row of a block."""
    ex = experiments.copy()
    ex["role"] = "absolute"
    for m in METRICS:
        ex[f"{m}_delta"] = np.nan
    if not baseline or ex.empty:
        return ex
    want = _norm(baseline)
    hit = ex.apply(lambda r: want in {_norm(r["method"]), _norm(r["label"]), _norm(r["choice"])}, axis=1)
    if not hit.any():
        names = sorted(set(ex["label"]) | set(ex["method"]))
        raise ConfigError(f"--baseline {baseline!r} matches no method of the complete runs; valid: {', '.join(names)}")
    for _, idx in ex.groupby("block_key", sort=False).groups.items():
        block = ex.loc[idx]
        base = block[hit.loc[idx]]
        if len(base) > 1:
            raise ConfigError(
                f"--baseline {baseline!r} matches {len(base)} rows of block {block['block'].iloc[0]!r} "
                f"({', '.join(base['label'])}); name one of them"
            )
        if len(base) == 0:
            continue
        b = base.index[0]
        ex.loc[idx, "role"] = "delta"
        ex.loc[b, "role"] = "baseline"
        for m in METRICS:
            ex.loc[idx, f"{m}_delta"] = ex.loc[idx, m] - ex.loc[b, m]
        ex.loc[b, [f"{m}_delta" for m in METRICS]] = np.nan
    order = ex["role"].map({"baseline": 0}).fillna(1)
    ex = ex.assign(_o=order).sort_values(
        ["block", "_o", "label"], key=lambda s: s.map(natural_key) if s.name != "_o" else s
    )
    return ex.drop(columns="_o").reset_index(drop=True)


def paired_tests(runs: pd.DataFrame, experiments: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """Per block with a baseline, per other row and metric: the paired tests over the seeds both
    have (cl_bench.report.stats.paired_test). Columns: block, label, baseline, metric, n (pairs), seeds,
    unpaired (seeds only one side has), mean_diff, std_diff, t, p_t, p_signflip, min_p_signflip."""
    from .stats import paired_test

    seeds = per_seed(runs).set_index(["exp_id", "seed"])
    rows = []
    for _, block in experiments.groupby("block_key", sort=False):
        base = block[block["role"] == "baseline"]
        if base.empty:
            continue
        b = base.iloc[0]
        b_vals = seeds.loc[b["exp_id"]]
        for _, e in block[block["role"] == "delta"].iterrows():
            e_vals = seeds.loc[e["exp_id"]]
            for m in metrics or METRICS:
                both = pd.concat([e_vals[m].rename("x"), b_vals[m].rename("y")], axis=1).dropna()
                if both.empty and e_vals[m].isna().all():
                    continue
                common = sorted(both.index, key=str)
                test = paired_test(both.loc[common, "x"].tolist(), both.loc[common, "y"].tolist())
                unpaired = len(set(e_vals[m].dropna().index) ^ set(b_vals[m].dropna().index))
                rows.append(
                    {
                        "block": e["block"],
                        "label": e["label"],
                        "baseline": b["label"],
                        "metric": m,
                        "n": test.n,
                        "seeds": ",".join(map(str, common)),
                        "unpaired": unpaired,
                        "mean_diff": test.mean_diff,
                        "std_diff": test.std_diff,
                        "t": test.t,
                        "p_t": test.p_t,
                        "p_signflip": test.p_signflip,
                        "min_p_signflip": test.min_p_signflip,
                    }
                )
    return pd.DataFrame(
        rows,
        columns=[
            "block",
            "label",
            "baseline",
            "metric",
            "n",
            "seeds",
            "unpaired",
            "mean_diff",
            "std_diff",
            "t",
            "p_t",
            "p_signflip",
            "min_p_signflip",
        ],
    )


def projection_records(runs: pd.DataFrame) -> pd.DataFrame:
    """Per complete run and stage where a gradient projection was considered (SLICE's ψ; results.json
    stages[i].init): fired, cos(G_cur, G_prev), γ, modules fired / modules."""
    rows = []
    for _, r in runs[runs["complete"]].iterrows():
        for st in r["results"].get("stages") or []:
            init = st.get("init") or {}
            if init.get("cos_global") is None and "fired" not in init:
                continue
            if str(init.get("projection", "")).startswith(("not applicable", "skipped")):
                continue
            per_module = init.get("per_module") or {}
            rows.append(
                {
                    "block": r["block"],
                    "label": r["label"],
                    "exp_id": r["exp_id"],
                    "seed": r["seed"],
                    "stage": st.get("stage"),
                    "task": st.get("task"),
                    "fired": bool(init.get("fired")),
                    "cos": init.get("cos_global"),
                    "gamma": init.get("gamma"),
                    "modules_fired": per_module.get("fired"),
                    "modules": per_module.get("n"),
                    "projection": init.get("projection"),
                    "run": r["run"],
                }
            )
    return pd.DataFrame(
        rows,
        columns=[
            "block",
            "label",
            "exp_id",
            "seed",
            "stage",
            "task",
            "fired",
            "cos",
            "gamma",
            "modules_fired",
            "modules",
            "projection",
            "run",
        ],
    )


# ---- the whole report ---------------------------------------------------------------------------
@dataclass
class Report:
    """Everything the report shows (collect): runs, experiments, paired tests, projection, notes."""

    runs: pd.DataFrame  # one row per run (every state)
    experiments: pd.DataFrame  # one row per experiment (complete runs), with role and deltas
    paired: pd.DataFrame  # paired tests vs the baseline
    projection: pd.DataFrame  # projection per run and stage
    notes: list[str]  # duplicates, unexpected differences, commits
    baseline: str | None
    metrics: list[str]  # metrics with at least one value
    table_metrics: list[str]  # metrics of the paper-layout table
    files: list[Path] = field(default_factory=list)
    metrics_as: str | None = None  # a paper of paper_names.METRICS_AS: its names for the tables

    @property
    def not_complete(self) -> pd.DataFrame:
        return self.runs[self.runs["state"] != "complete"]


def collect(
    paths: list[str],
    baseline: str | None = None,
    table_metrics: list[str] | None = None,
    progress: bool | None = None,
    metrics_as: str | None = None,
) -> Report:
    """Everything the report shows, computed from the run dirs (no files written). `metrics_as`:
    a paper whose metric names the named table uses (METRICS_AS). Raises ConfigError when no run
    is found, or the baseline or paper is invalid."""
    if metrics_as is not None and metrics_as not in METRICS_AS:
        raise ConfigError(f"--metrics-as: unknown {metrics_as!r}; valid: {', '.join(METRICS_AS)}")
    found = find_runs(paths)
    if not found.results and not found.no_results:
        raise ConfigError(f"no results.json below {', '.join(paths)}")
    runs = load_runs(found.results, progress)
    extra = not_started_rows(found)
    if extra:
        runs = pd.concat([runs, pd.DataFrame(extra)], ignore_index=True)
        runs["complete"] = runs["state"] == "complete"
    runs = label_experiments(runs)
    runs["FWT_scratch"] = scratch_fwt(runs)
    experiments = mark_baseline(aggregate(runs), baseline)
    metrics = [m for m in METRICS if m not in NAMED_ONLY and not experiments.empty and experiments[m].notna().any()]
    wanted = table_metrics or PAPER_METRICS
    unknown = [m for m in wanted if m not in METRICS]
    if unknown:
        raise ConfigError(f"--metrics: unknown {', '.join(unknown)}; valid: {', '.join(METRICS)}")
    table_metrics = [m for m in wanted if m in metrics]
    paired = paired_tests(runs, experiments, metrics)
    notes = duplicates(runs) + unexpected_differences(runs)
    return Report(
        runs, experiments, paired, projection_records(runs), notes, baseline, metrics, table_metrics, [], metrics_as
    )

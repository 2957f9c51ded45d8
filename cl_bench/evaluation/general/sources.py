"""Where each general benchmark's data comes from: local files under `data.root/general`
(rewritten as lm-eval tasks that include lm-eval's own task file: same prompt, other data
source), lm-eval's registry by name (needs the Hub or a filled HF cache), or families generated
by the project (`synthetic`); and writing the local and synthetic data where lm-eval reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...infra.errors import DataError
from . import tasks as gt
from .config import BENCHMARKS, BenchmarkConfig, BenchmarkSpec, GeneralEvalConfig, parse_config

SYNTHETIC_TEST_ROWS = 200  # generated per synthetic family; `limit` picks how many are scored


@dataclass(frozen=True)
class PreparedBenchmark:
    """A benchmark resolved to one lm-eval task name and the place its data comes from."""

    config: BenchmarkConfig
    task: str  # lm-eval task name to load
    source: str  # "registry" | "local:<path>" | "synthetic"
    registry: bool
    pool_dropped_duplicates: int = 0  # demonstrations dropped for repeating a scored document


def _local_path(bench: BenchmarkConfig, spec: BenchmarkSpec, data_root: str | None) -> Path | None:
    rel = bench.file or spec.local_file
    if rel is None:
        return None
    path = Path(rel)
    if not path.is_absolute():
        if data_root is None:
            return None
        path = Path(data_root) / "general" / rel
    return path if path.is_file() else None


def _where(bench: BenchmarkConfig, spec: BenchmarkSpec, data_root: str | None) -> str:
    rel = bench.file or spec.local_file
    return str(Path(rel) if Path(rel).is_absolute() or data_root is None else Path(data_root) / "general" / rel)


def resolve_sources(cfg: GeneralEvalConfig, data_root: str | None) -> dict[str, str]:
    """Where each benchmark's data comes from: "synthetic", "registry" or "local:<path>".
    Cheap (nothing is read or written), so the runner can call it before loading the model;
    a required local file that is missing is a DataError."""
    sources = {}
    for bench in cfg.benchmarks:
        spec = BENCHMARKS[bench.name]
        if bench.source == "synthetic":
            sources[bench.name] = "synthetic"
            continue
        path = _local_path(bench, spec, data_root) if bench.source != "registry" else None
        if path is not None:
            sources[bench.name] = f"local:{path.resolve()}"
        elif bench.source in ("registry", "local_or_registry") and spec.registry_task:
            sources[bench.name] = "registry"
        else:
            raise DataError(
                f"general_eval.benchmarks.{bench.name}: data file {_where(bench, spec, data_root)} not found; "
                f"set data.root to a folder with general/{spec.local_file}"
                + (" or use source=registry (needs the Hub)" if spec.registry_task else "")
            )
    return sources


def check_data(gcfg: Any, data_root: str | None) -> dict[str, str]:
    """Config and data-source check for the runner's prepare step (before any model is loaded)."""
    return resolve_sources(parse_config(gcfg), data_root)


def prepare_benchmarks(
    cfg: GeneralEvalConfig, *, data_root: str | None, work_dir: str | Path, seed: int
) -> list[PreparedBenchmark]:
    """Resolve each benchmark's source and write the lm-eval task YAML/JSONL of local and synthetic
    ones under `work_dir/tasks` (absolute data paths). Missing local data is a DataError."""
    tasks_dir = Path(work_dir).resolve() / "tasks"
    cache_dir = Path(work_dir).resolve() / "hf_datasets_cache"
    sources = resolve_sources(cfg, data_root)
    prepared = []
    for bench in cfg.benchmarks:
        spec, source = BENCHMARKS[bench.name], sources[bench.name]
        task_name = f"clb_{bench.name}"
        if source == "registry":
            prepared.append(PreparedBenchmark(bench, bench.task or spec.registry_task, source, registry=True))
            continue
        if source == "synthetic":
            family = bench.name.removeprefix("synthetic_")
            pool, test = gt.synthetic_rows(family, seed, SYNTHETIC_TEST_ROWS, cfg.fewshot_pool)
            files = {
                "train": gt.write_jsonl(tasks_dir / f"{task_name}.train.jsonl", pool),
                "test": gt.write_jsonl(tasks_dir / f"{task_name}.test.jsonl", test),
            }
            include = gt.TEMPLATE_DIR / spec.template
        else:
            files, dropped = _write_local_data(
                bench, spec, Path(source.removeprefix("local:")), tasks_dir, task_name, cfg.fewshot_pool, seed
            )
            # lm-eval's own task file when there is one: same prompt and splits, other data source.
            include = (
                (_lm_eval_tasks_dir() / spec.lm_eval_yaml) if spec.lm_eval_yaml else gt.TEMPLATE_DIR / spec.template
            )
        gt.write_task_yaml(tasks_dir / f"{task_name}.yaml", gt.task_yaml(task_name, include, files, cache_dir))
        prepared.append(
            PreparedBenchmark(
                bench,
                task_name,
                source,
                registry=False,
                pool_dropped_duplicates=0 if source == "synthetic" else dropped,
            )
        )
    return prepared


def _write_local_data(bench, spec, path: Path, tasks_dir: Path, task_name: str, n_pool: int, seed: int):
    """Write the few-shot pool and the scored rows; returns (files, demonstrations dropped because
    they repeat a scored document, which would put its answer in the prompt)."""
    rows = spec.read_rows(path)
    pool_split, eval_split = spec.split_names
    if not pool_split:  # demonstrations are fixed in the task config (BBH)
        return {eval_split: gt.write_jsonl(tasks_dir / f"{task_name}.{eval_split}.jsonl", rows)}, 0
    pool_path = path.parent / spec.local_pool_file if spec.local_pool_file and not bench.file else None
    if pool_path is not None and pool_path.is_file():
        pool, test = spec.read_rows(pool_path), rows
    else:
        pool, test = gt.seeded_split(rows, n_pool, seed)
    pool, dropped = gt.drop_scored_prompts(pool, test, spec.prompt_fields)
    return {
        pool_split: gt.write_jsonl(tasks_dir / f"{task_name}.{pool_split}.jsonl", pool),
        eval_split: gt.write_jsonl(tasks_dir / f"{task_name}.{eval_split}.jsonl", test),
    }, dropped


def _lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"

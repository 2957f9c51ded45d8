"""The `general_eval` config group: which benchmarks exist (BENCHMARKS), how each is configured
(BenchmarkConfig, GeneralEvalConfig), their validation (parse_config; every error a one-line
ConfigError) and when GP/IP are evaluated (should_run).

A benchmark enters GP or IP only when the config says so and the lists are recorded: the SLICE
authors' GP silently averaged in a ~0 BBH zero-shot score, and a benchmark not in GP is not run 0-shot.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...infra.errors import ConfigError
from . import tasks as gt

WHEN_CHOICES = ("stage0_and_final", "every_stage", "none")
BENCH_KEYS = ("source", "gp", "ip", "shots", "limit", "task", "metric", "file", "generation_kwargs")
TOP_KEYS = (
    "when",
    "batch_size",
    "limit",
    "apply_chat_template",
    "fewshot_as_multiturn",
    "max_length",
    "fewshot_pool",
    "benchmarks",
)


@dataclass(frozen=True)
class BenchmarkSpec:
    """What the project knows about a benchmark: where its task and data come from."""

    sources: tuple[str, ...]  # allowed sources; the first is the default
    metric: str  # lm-eval result key "metric,filter"
    registry_task: str | None = None  # lm-eval task name
    lm_eval_yaml: str | None = None  # that task's file, relative to lm_eval/tasks (for local data)
    template: str | None = None  # our template in cl_bench/lm_eval_tasks (custom benchmarks)
    local_file: str | None = None  # default file under data.root/general
    read_rows: Callable[[Path], list[dict]] | None = None
    # Local files that come with their own few-shot pool (else one is split off the eval file).
    local_pool_file: str | None = None
    split_names: tuple[str, str] = ("train", "test")  # (few-shot split, eval split) of the task
    # Fields that make a row's prompt: a demonstration equal to a scored row on them is dropped.
    prompt_fields: tuple[str, ...] = ()


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "hellaswag": BenchmarkSpec(
        sources=("local_or_registry", "registry", "local"),
        metric="acc_norm,none",
        registry_task="hellaswag",
        lm_eval_yaml="hellaswag/hellaswag.yaml",
        local_file="hellaswag_validation.jsonl",
        local_pool_file="hellaswag_train.jsonl",
        read_rows=gt.hellaswag_rows,
        split_names=("train", "validation"),
        prompt_fields=("activity_label", "ctx_a", "ctx_b"),
    ),
    "commonsense_qa": BenchmarkSpec(
        sources=("local_or_registry", "registry", "local"),
        metric="acc,none",
        registry_task="commonsense_qa",
        lm_eval_yaml="commonsense_qa/default.yaml",
        local_file="commonsenseqa_validation.jsonl",
        local_pool_file="commonsenseqa_train.jsonl",
        read_rows=gt.commonsense_qa_rows,
        split_names=("train", "validation"),
        prompt_fields=("question", "choices"),
    ),
    # The SLICE authors' task: 3 fixed chain-of-thought demonstrations, answer after "the answer is".
    "bbh_object_counting": BenchmarkSpec(
        sources=("local_or_registry", "registry", "local"),
        metric="exact_match,get-answer",
        registry_task="bbh_cot_fewshot_object_counting",
        lm_eval_yaml="bbh/cot_fewshot/object_counting.yaml",
        local_file="bbh_object_counting.json",
        read_rows=gt.bbh_rows,
        split_names=("", "test"),
    ),
    # AlpacaEval instructions with text-davinci-003 references: the model that wrote the Stanford
    # Alpaca answers the authors scored against (the GPT-4 references are ~6x longer).
    "alpaca": BenchmarkSpec(
        sources=("local",),
        metric="rouge_l,none",
        template="alpaca.yaml",
        local_file="alpaca_eval_text_davinci_003_reference.json",
        read_rows=gt.alpaca_rows,
        prompt_fields=("instruction", "input"),
    ),
    "synthetic_odd_one_out": BenchmarkSpec(
        sources=("synthetic",), metric="acc,none", template="synthetic_odd_one_out.yaml"
    ),
    "synthetic_count_items": BenchmarkSpec(
        sources=("synthetic",), metric="exact_match,first-number", template="synthetic_count_items.yaml"
    ),
}


@dataclass(frozen=True)
class BenchmarkConfig:
    """One benchmark as configured (general_eval.benchmarks.<name>), defaults filled in."""

    name: str
    source: str
    gp: bool
    ip: bool
    shots: int
    limit: int | None
    task: str | None  # registry task override
    metric: str
    file: str | None
    generation_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GeneralEvalConfig:
    """The validated general_eval group (parse_config)."""

    when: str
    batch_size: int | str  # an int, or "auto" (lm-eval probes the largest batch on CUDA; CPU_AUTO_BATCH on CPU)
    limit: int | None
    apply_chat_template: bool
    fewshot_as_multiturn: bool
    max_length: int | None
    fewshot_pool: int
    benchmarks: tuple[BenchmarkConfig, ...]

    @property
    def gp_benchmarks(self) -> list[str]:
        return [b.name for b in self.benchmarks if b.gp]

    @property
    def ip_benchmarks(self) -> list[str]:
        return [b.name for b in self.benchmarks if b.ip]


def _plain(cfg: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    return cfg


def _int(value: Any, key: str, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        valid = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        raise ConfigError(f"general_eval.{key}={value!r} is invalid; valid: {valid}")
    return value


def _batch_size(value: Any) -> int | str:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"general_eval.batch_size={value!r} is invalid; valid: auto or an integer >= 1")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"general_eval.{key}={value!r} is invalid; valid: true, false")
    return value


def parse_config(gcfg: Any) -> GeneralEvalConfig:
    """Validate the `general_eval` group (a DictConfig or dict); every error is a one-line ConfigError."""
    raw = _plain(gcfg) or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"general_eval must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"general_eval.{unknown[0]} is not a known key; valid: {', '.join(TOP_KEYS)}")
    when = raw.get("when", "stage0_and_final")
    if when not in WHEN_CHOICES:
        raise ConfigError(f"general_eval.when={when!r} is invalid; valid: {', '.join(WHEN_CHOICES)}")
    benches_raw = raw.get("benchmarks") or {}
    if not isinstance(benches_raw, Mapping):
        raise ConfigError("general_eval.benchmarks must map benchmark names to settings")
    if when != "none" and not benches_raw:
        raise ConfigError(
            f"general_eval.benchmarks is empty while general_eval.when={when!r}; "
            f"valid benchmarks: {', '.join(BENCHMARKS)}"
        )
    benchmarks = tuple(_parse_benchmark(name, b) for name, b in benches_raw.items())
    return GeneralEvalConfig(
        when=when,
        batch_size=_batch_size(raw.get("batch_size", 8)),
        limit=_int(raw.get("limit"), "limit", 1, allow_none=True),
        apply_chat_template=_bool(raw.get("apply_chat_template", False), "apply_chat_template"),
        fewshot_as_multiturn=_bool(raw.get("fewshot_as_multiturn", False), "fewshot_as_multiturn"),
        max_length=_int(raw.get("max_length"), "max_length", 16, allow_none=True),
        fewshot_pool=_int(raw.get("fewshot_pool", 25), "fewshot_pool", 1),
        benchmarks=benchmarks,
    )


def _parse_benchmark(name: str, raw: Any) -> BenchmarkConfig:
    if name not in BENCHMARKS:
        raise ConfigError(f"general_eval.benchmarks.{name} is not a known benchmark; valid: {', '.join(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"general_eval.benchmarks.{name} must be a mapping of {', '.join(BENCH_KEYS)}")
    key = f"benchmarks.{name}"
    unknown = sorted(set(raw) - set(BENCH_KEYS))
    if unknown:
        raise ConfigError(f"general_eval.{key}.{unknown[0]} is not a known key; valid: {', '.join(BENCH_KEYS)}")
    source = raw.get("source") or spec.sources[0]
    if source not in spec.sources:
        raise ConfigError(f"general_eval.{key}.source={source!r} is invalid; valid: {', '.join(spec.sources)}")
    gp, ip = _bool(raw.get("gp", True), f"{key}.gp"), _bool(raw.get("ip", True), f"{key}.ip")
    if not (gp or ip):
        raise ConfigError(f"general_eval.{key}: gp and ip are both false; enable one or remove the benchmark")
    shots = _int(raw.get("shots", 5), f"{key}.shots", 1)
    task = raw.get("task")
    if task is not None and (spec.registry_task is None or not isinstance(task, str)):
        raise ConfigError(
            f"general_eval.{key}.task={task!r} is invalid; only registry benchmarks "
            f"({', '.join(n for n, s in BENCHMARKS.items() if s.registry_task)}) take an lm-eval task name"
        )
    if task is not None and source != "registry":
        raise ConfigError(
            f"general_eval.{key}.task={task!r} needs source=registry (local data keeps "
            f"the task {spec.registry_task!r} whose file it includes)"
        )
    metric = raw.get("metric") or spec.metric
    if not isinstance(metric, str) or "," not in metric:
        raise ConfigError(
            f"general_eval.{key}.metric={metric!r} is invalid; valid: an lm-eval result key "
            f"'metric,filter' such as {spec.metric!r}"
        )
    file = raw.get("file")
    if file is not None and spec.read_rows is None:
        raise ConfigError(f"general_eval.{key}.file={file!r} is invalid; {name} has no data file")
    gen = raw.get("generation_kwargs") or {}
    if not isinstance(gen, Mapping):
        raise ConfigError(
            f"general_eval.{key}.generation_kwargs={gen!r} is invalid; valid: a mapping such as {{max_gen_toks: 256}}"
        )
    return BenchmarkConfig(
        name=name,
        source=source,
        gp=gp,
        ip=ip,
        shots=shots,
        limit=_int(raw.get("limit"), f"{key}.limit", 1, allow_none=True),
        task=task,
        metric=metric,
        file=file,
        generation_kwargs=dict(gen),
    )


def should_run(gcfg: Any, stage: int, num_stages: int) -> bool:
    """Whether GP/IP are evaluated after `stage` (0 = before any training) of `num_stages`."""
    when = parse_config(gcfg).when
    if when == "none":
        return False
    if when == "every_stage":
        return True
    return stage in (0, num_stages)

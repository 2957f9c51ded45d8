"""Running lm-eval in process on the in-memory model: the HFLM that counts truncated requests,
lm-eval's log filters, the RNG and train/eval-mode preservation around it, the task manager,
run_benchmarks / evaluate_general, and the GP/IP aggregation of their scores.

lm-eval ignores `simple_evaluate(batch_size=...)` when given a model object: the batch size is
passed to `HFLM` itself.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from ...infra.errors import ConfigError, DataError
from .config import BENCHMARKS, GeneralEvalConfig, parse_config
from .sources import PreparedBenchmark, prepare_benchmarks

# batch_size=auto off CUDA: lm-eval's probe (try 64 rows of the longest request, halve on
# out-of-memory) relies on CUDA raising out-of-memory; on the CPU an oversized batch is not
# refused but swaps or is killed, so a fixed batch is used instead.
CPU_AUTO_BATCH = 32


def hflm_batch_size(batch_size: int | str, device) -> int | str:
    """What HFLM gets: the configured int, or "auto" on CUDA / CPU_AUTO_BATCH elsewhere."""
    if batch_size != "auto":
        return batch_size
    import torch

    return "auto" if torch.device(device).type == "cuda" else CPU_AUTO_BATCH


class _LmEvalNoise(logging.Filter):
    """Drops lm-eval's per-request truncation warnings (they are counted exactly by
    `counting_hflm` and recorded per benchmark instead of flooding the log) and the harmless
    notes about passing a model object."""

    _DROPPED = (
        "Combined length of context",
        "Left truncation applied",
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self._DROPPED)


REQUEST_TYPES = ("loglikelihood", "generate_until")


@lru_cache(maxsize=1)
def counting_hflm():
    """lm-eval's HFLM, counting every request it left-truncates, per lm-eval task and request type.

    lm-eval cuts too-long inputs from the left without failing: a loglikelihood request whose
    context + continuation exceeds max_length + 1 tokens (its condition in `_loglikelihood_tokens`)
    and a generation prompt longer than max_length - max_gen_toks (`tok_batch_encode`'s
    left_truncate_len). Both are counted here, attributed to the request's task through the
    Instance objects. `truncated` is {task: {"loglikelihood": n, "generate_until": n}}.
    """
    from lm_eval.models.huggingface import HFLM

    class CountingHFLM(HFLM):
        def __init__(self, *args, synced: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.synced = synced  # sharded model: generation runs until every rank is done
            self.truncated: dict[str, dict[str, int]] = {}
            self._pending: list[str] | None = None  # task of each loglikelihood request, in order
            self._task_of_context: dict[str, str] = {}
            self._contexts: dict[tuple[int, ...], int] | None = None  # see context_lengths

        def _count(self, task: str, kind: str, n: int = 1) -> None:
            counts = self.truncated.setdefault(task, dict.fromkeys(REQUEST_TYPES, 0))
            counts[kind] += n

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._pending = [req.task_name for req in requests]
            try:
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            finally:
                self._pending = None

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            tasks = self._pending if self._pending is not None and len(self._pending) == len(requests) else None
            if self.backend == "causal":
                for i, (_, context_enc, continuation_enc) in enumerate(requests):
                    if len(context_enc) + len(continuation_enc) > self.max_length + 1:
                        self._count(tasks[i] if tasks else "?", "loglikelihood")
                self._contexts = context_lengths(requests, self.max_length)
            try:
                return super()._loglikelihood_tokens(requests, *args, **kwargs)
            finally:
                self._contexts = None

        def _model_call(self, inps, attn_mask=None, labels=None):
            """lm-eval calls the model on context + continuation (+ right padding) without a mask:
            a gated model (GainLoRA) must pool each row's context only (lora/gating.py)."""
            if attn_mask is not None or labels is not None or self._contexts is None:
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            from ...lora.gating import prompt_tokens

            with prompt_tokens(self.model, lambda: context_mask(inps, self._contexts)):
                return super()._model_call(inps)

        def generate_until(self, requests, disable_tqdm: bool = False):
            self._task_of_context = {req.args[0]: req.task_name for req in requests}
            try:
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
            finally:
                self._task_of_context = {}

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if self.synced:
                generation_kwargs["synced_gpus"] = True
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

        def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
            ids, mask = super().tok_batch_encode(
                strings, padding_side=padding_side, left_truncate_len=None, truncation=truncation
            )
            if left_truncate_len:
                for text, length in zip(strings, mask.sum(dim=1).tolist()):
                    if length > left_truncate_len:
                        self._count(self._task_of_context.get(text, "?"), "generate_until")
                # lm-eval's own cut (left padding, so each row keeps its last tokens)
                ids, mask = ids[:, -left_truncate_len:], mask[:, -left_truncate_len:]
            return ids, mask

    return CountingHFLM


def context_lengths(requests, max_length: int) -> dict[tuple[int, ...], int]:
    """{input row lm-eval builds for a loglikelihood request: how many of its first tokens are the
    request's context}. The row is (context + continuation)[-(max_length + 1):][:-1], as in HFLM's
    `_loglikelihood_tokens`; two requests giving one row (one's context = the other's context
    plus part of its continuation, which lm-eval may also score in one pass) keep the shorter."""
    out: dict[tuple[int, ...], int] = {}
    for _, context, continuation in requests:
        row = tuple((list(context) + list(continuation))[-(max_length + 1) :][:-1])
        n = len(row) - len(continuation) + 1
        out[row] = min(out.get(row, n), n)
    return out


def context_mask(inps, lengths: dict[tuple[int, ...], int]):
    """[batch, width] bool: the context tokens of each right-padded (pad id 0) row of `inps`.
    A row that is no request's (lm-eval's batch-size probe: one token repeated) counts whole;
    anything else is a RuntimeError, never a silent guess."""
    import torch

    mask = torch.zeros(inps.shape, dtype=torch.bool)
    for r, row in enumerate(inps.tolist()):
        n = len(row)
        while tuple(row[:n]) not in lengths and n > 0 and row[n - 1] == 0:
            n -= 1  # strip the right padding one token at a time (a real token may be 0 too)
        if tuple(row[:n]) in lengths:
            mask[r, : lengths[tuple(row[:n])]] = True
        elif len(set(row)) == 1:
            mask[r] = True
        else:
            raise RuntimeError(f"lm-eval called the model on a row of {len(row)} tokens that is no request's")
    return mask.to(inps.device)


@contextmanager
def _lm_eval_logging() -> Iterator[_LmEvalNoise]:
    noise = _LmEvalNoise()
    loggers = [logging.getLogger(n) for n in ("lm_eval.models.huggingface", "lm_eval.evaluator", "lm_eval.api.task")]
    root = logging.getLogger("lm_eval")
    old_level = root.level
    root.setLevel(logging.WARNING)  # lm-eval's INFO lines are per task and per request batch
    for lg in loggers:
        lg.addFilter(noise)
    try:
        yield noise
    finally:
        for lg in loggers:
            lg.removeFilter(noise)
        root.setLevel(old_level)


@contextmanager
def _quiet_dataset_building() -> Iterator[None]:
    """No "Generating split" bars for the small JSON files rebuilt at every evaluation."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


@contextmanager
def _preserved_rng() -> Iterator[None]:
    """simple_evaluate reseeds Python, NumPy and torch globally; the CL run after it must not
    depend on whether GP/IP were evaluated, so all generator states are put back."""
    import numpy as np
    import torch

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def _preserved_modes(model) -> Iterator[None]:
    """HFLM puts the model in eval mode; give every module back the train/eval flag it had."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def make_task_manager(prepared: list[PreparedBenchmark], work_dir: str | Path):
    """Our task folder only, unless a benchmark is requested from the registry by name
    (indexing lm-eval's ~10k built-in tasks costs ~6 s)."""
    from lm_eval.tasks import TaskManager

    tasks_dir = Path(work_dir).resolve() / "tasks"
    include = str(tasks_dir) if tasks_dir.is_dir() else None
    return TaskManager(include_path=include, include_defaults=any(p.registry for p in prepared))


def _load_task(task_manager, item: PreparedBenchmark, shots: int):
    """A fresh lm-eval Task for one run (Task objects keep per-run state), with our overrides."""
    try:
        loaded = task_manager.load([item.task])
    except Exception as exc:  # a registry task whose dataset cannot be fetched
        if not item.registry:
            raise
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        local = BENCHMARKS[item.config.name].local_file
        raise DataError(
            f"general_eval.benchmarks.{item.config.name}: lm-eval task {item.task!r} could not be loaded "
            f"({type(exc).__name__}: {first_line}); offline, put general/{local} under data.root "
            f"(source=local_or_registry), pre-fill the HF datasets cache, or drop the benchmark "
            f"(~general_eval.benchmarks.{item.config.name})"
        ) from exc
    task = loaded["tasks"][item.task]
    task.set_config(key="num_fewshot", value=shots)
    if item.config.generation_kwargs:
        current = dict(task.get_config("generation_kwargs") or {})
        task.set_config(key="generation_kwargs", value={**current, **item.config.generation_kwargs})
    return task


def run_benchmarks(
    lm, prepared: list[PreparedBenchmark], cfg: GeneralEvalConfig, *, task_manager, seed: int, system: str | None = None
) -> dict:
    """Run every GP benchmark 0-shot and every IP benchmark k-shot through `simple_evaluate` on
    one lm-eval LM (one call per mode, so requests of all benchmarks share batches). `system` is
    the system message of chat-templated prompts. Truncated requests are counted when `lm` is a
    `counting_hflm()`: details[bench]["truncated"][mode] = {"loglikelihood": n, "generate_until": n}
    and `truncated_contexts` = {mode: total over benchmarks and request types}.
    Returns None on a rank where lm-eval returns no results: when every rank runs the same
    requests (a sharded model), only the one with LOCAL_RANK 0 does."""
    from lm_eval import simple_evaluate

    scores: dict[str, dict[str, float]] = {"zero_shot": {}, "few_shot": {}}
    counts: dict[str, dict[str, int]] = {"zero_shot": {}, "few_shot": {}}
    truncated: dict[str, dict[str, dict[str, int]]] = {"zero_shot": {}, "few_shot": {}}
    chat = cfg.apply_chat_template
    quiet = False  # lm-eval returned None here: this rank ran the requests, another one scores them
    modes = (
        ("zero_shot", [p for p in prepared if p.config.gp], lambda b: 0),
        ("few_shot", [p for p in prepared if p.config.ip], lambda b: b.shots),
    )
    for mode, items, shots_of in modes:
        if not items:
            continue
        tasks, samples = [], {}
        for item in items:
            task = _load_task(task_manager, item, shots_of(item.config))
            limit = item.config.limit if item.config.limit is not None else cfg.limit
            n_docs = len(task.eval_docs)
            if limit is not None and limit < n_docs:
                samples[item.task] = list(range(limit))  # first docs: local files are stored shuffled
            tasks.append(task)
        lm_truncated = getattr(lm, "truncated", None)
        if lm_truncated is not None:
            lm_truncated.clear()
        with _lm_eval_logging():
            out = simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=task_manager,
                num_fewshot=None,
                samples=samples or None,
                bootstrap_iters=0,
                log_samples=False,
                apply_chat_template=chat,
                fewshot_as_multiturn=chat and cfg.fewshot_as_multiturn,
                system_instruction=system if chat else None,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        if out is None:
            quiet = True
            continue
        for item in items:
            truncated[mode][item.config.name] = dict(
                (lm_truncated or {}).get(item.task, dict.fromkeys(REQUEST_TYPES, 0))
            )
        for item in items:
            result = out["results"][item.task]
            if item.config.metric not in result:
                available = sorted(k for k, v in result.items() if isinstance(v, (int, float)) and "stderr" not in k)
                raise ConfigError(
                    f"general_eval.benchmarks.{item.config.name}.metric={item.config.metric!r} is not in lm-eval's "
                    f"output for {item.task}; valid: {', '.join(available)}"
                )
            scores[mode][item.config.name] = 100.0 * float(result[item.config.metric])
            counts[mode][item.config.name] = int(out["n-samples"][item.task]["effective"])
    if quiet:
        return None
    details = {}
    for item in prepared:
        b = item.config
        ns = {counts[m][b.name] for m in counts if b.name in counts[m]}
        assert len(ns) == 1, f"{b.name}: zero- and few-shot scored different documents {ns}"
        details[b.name] = {
            "task": item.task,
            "metric": b.metric,
            "source": item.source,
            "n": ns.pop(),
            "shots": b.shots if b.ip else 0,
            "gp": b.gp,
            "ip": b.ip,
            "truncated": {m: truncated[m][b.name] for m in truncated if b.name in truncated[m]},
            "pool_dropped_duplicates": item.pool_dropped_duplicates,
            **({"generation_kwargs": dict(b.generation_kwargs)} if b.generation_kwargs else {}),
        }
    totals = {m: sum(sum(c.values()) for c in per_bench.values()) for m, per_bench in truncated.items() if per_bench}
    return {
        "zero_shot": scores["zero_shot"],
        "few_shot": scores["few_shot"],
        "details": details,
        "benchmarks": {"gp": cfg.gp_benchmarks, "ip": cfg.ip_benchmarks},
        "truncated_contexts": totals,
    }


def evaluate_general(
    model,
    tokenizer,
    gcfg,
    *,
    data_root: str | None,
    work_dir: str,
    device,
    seed: int,
    prompt=None,
    synced: bool = False,
) -> dict:
    """GP/IP benchmarks of the in-memory `model` (PEFT or merged, already on `device`; not moved,
    copied or left in another train/eval mode). `prompt` (data.PromptFormat; default: the default
    config's) renders lm-eval's chat template when general_eval.apply_chat_template is on: same
    template, fixed date and system message as training and evaluation. Returns
    {"zero_shot": {bench: %}, "few_shot": {bench: %}, "details": {bench: {..., "truncated": {...}}},
     "benchmarks": {"gp": [...], "ip": [...]}, "truncated_contexts": {mode: n}, "seconds": float}.
    `synced` (a sharded model, called on every rank with the same requests): generation runs until
    every rank is done, and batch_size "auto" is CPU_AUTO_BATCH (a probe by out-of-memory could
    pick different sizes on different ranks). Returns None on the ranks lm-eval keeps quiet (LOCAL_RANK > 0)."""
    import dataclasses

    from ...data.prompts import PromptFormat

    start = time.time()
    cfg = parse_config(gcfg)
    if cfg.apply_chat_template and not getattr(tokenizer, "chat_template", None):  # lm-eval would fail mid-run
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise ConfigError(
            f"general_eval.apply_chat_template=true but the tokenizer of {name} has no chat template; "
            "set general_eval.apply_chat_template=false"
        )
    prompt = prompt if prompt is not None else PromptFormat()
    prepared = prepare_benchmarks(cfg, data_root=data_root, work_dir=work_dir, seed=seed)
    task_manager = make_task_manager(prepared, work_dir)
    with _preserved_rng(), _preserved_modes(model), _quiet_dataset_building():
        with _lm_eval_logging():
            # batch_size goes to HFLM: simple_evaluate ignores its own batch_size for an LM object.
            batch_size = (
                CPU_AUTO_BATCH if synced and cfg.batch_size == "auto" else hflm_batch_size(cfg.batch_size, device)
            )
            lm = counting_hflm()(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=batch_size,
                synced=synced,
                max_length=cfg.max_length,
                chat_template_args=dataclasses.replace(prompt, use_chat_template=True).chat_template_kwargs(tokenizer),
            )
        result = run_benchmarks(lm, prepared, cfg, task_manager=task_manager, seed=seed, system=prompt.system)
    if result is None:  # synced, on a rank that lm-eval keeps quiet: rank 0's result is the one kept
        return None
    result["seconds"] = round(time.time() - start, 3)
    return result


# ---------------------------------------------------------------------------- aggregation
def _mean_over(scores: Mapping[str, float], names: list[str]) -> float | None:
    if not names or any(scores.get(n) is None for n in names):
        return None  # never a mean over a silently shorter list
    return sum(float(scores[n]) for n in names) / len(names)


def aggregate_gp_ip(general_by_stage: Mapping[str, Mapping], gcfg, final_stage: int | None = None) -> dict:
    """GP = mean zero-shot score over the GP benchmarks, IP = mean few-shot score over the IP
    benchmarks, at the last evaluated stage (or at `final_stage`, when given, else None).
    None when a listed benchmark has no score there."""
    cfg = parse_config(gcfg)
    if not general_by_stage:
        return {"GP": None, "IP": None}
    stage = max(general_by_stage, key=int) if final_stage is None else str(final_stage)
    entry = general_by_stage.get(stage)
    if entry is None:
        return {"GP": None, "IP": None}
    return {
        "GP": _mean_over(entry.get("zero_shot", {}), cfg.gp_benchmarks),
        "IP": _mean_over(entry.get("few_shot", {}), cfg.ip_benchmarks),
    }

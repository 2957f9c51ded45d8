"""TRACE benchmark tasks (Wang et al., 2023), from the authors' distributed files.

Layout: `<Task>/{train,eval,test}.json`, each a JSON list of {"prompt", "answer"}; the prompt
already carries TRACE's task instruction, so it is the user turn as is. Looked up below
`data.root` as trace/<Task>, <Task>, and inside one `LLM-CL-Benchmark_<N>` archive folder (the
archive ships _500/_1000/_5000 training-size variants; with several present we refuse to pick
one silently). TRACE is only distributed as an archive (no HF Hub copy), so there is no Hub
fallback. Eval examples come from test.json (else eval.json, else held out of train.json).

Metrics are TRACE's official ones: accuracy for the multiple-choice and numeric tasks (the
option letter for C-STANCE/FOMC/ScienceQA; the number for NumGLUE), ROUGE-L for MeetingBank,
edit similarity for Py150 and SARI for 20Minuten (source = the paragraph being simplified).
Under evaluation.protocol=slice_paper every TRACE task is scored as the SLICE authors did: their
ROUGE-L (scoring.slice_rouge_l), multiple-choice and numeric tasks included (their cl_lora/eval.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from ...infra.errors import DataError
from ..answers import chosen_label
from .base import Example, TaskData, data_roots, split_for_task

TASKS = ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten")

# task -> (metric, label set for "accuracy" or None)
TASK_METRICS: dict[str, tuple[str, list[str] | None]] = {
    "C-STANCE": ("accuracy", ["A", "B", "C"]),
    "FOMC": ("accuracy", ["A", "B", "C"]),
    "ScienceQA": ("accuracy", ["A", "B", "C", "D", "E"]),
    "NumGLUE-cm": ("accuracy", None),  # numeric answer: exact match of the number
    "NumGLUE-ds": ("accuracy", None),
    "MeetingBank": ("rouge_l", None),
    "Py150": ("edit_similarity", None),
    "20Minuten": ("sari", None),
}

# The instruction TRACE puts before the 20Minuten paragraph; SARI's source is what follows it.
SIMPLIFY_PREFIX = "Provide a simplified version of the following paragraph in German.\n\n"

DOWNLOAD_HINT = (
    "download the TRACE archive linked from https://github.com/BeyonderXX/TRACE (README, 'Trace Benchmark') "
    "and unpack one variant so that <data.root>/trace/{task}/train.json exists, then set data.root=<dir> "
    "or env CL_BENCH_DATA=<dir>"
)


def resolve_task_name(name: str) -> str:
    by_lower = {t.lower(): t for t in TASKS}
    key = name.strip().lower().replace("_", "-")
    if key in by_lower:
        return by_lower[key]
    raise DataError(f"TRACE task {name!r} is unknown; valid: {', '.join(TASKS)}")


def _variant_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("LLM-CL-Benchmark_*") if p.is_dir()) if folder.is_dir() else []


def candidate_dirs(task: str, base: Path) -> list[Path]:
    """Task folders to try below one root. Variant folders are only used when exactly one
    exists at a level, so the training-set size is never chosen by accident."""
    dirs = [base / "trace" / task, base / task]
    for level in (base / "trace", base):
        variants = _variant_dirs(level)
        if len(variants) > 1 and any((v / task / "train.json").is_file() for v in variants):
            names = ", ".join(v.name for v in variants)
            raise DataError(
                f"TRACE task {task!r}: several archive variants under {level} ({names}); "
                f"set data.root to the one you want, e.g. data.root={variants[0]}"
            )
        dirs += [v / task for v in variants]
    return dirs


def _source_of(task: str, prompt: str) -> str | None:
    if task != "20Minuten":
        return None
    start = prompt.find(SIMPLIFY_PREFIX)
    return prompt[start + len(SIMPLIFY_PREFIX) :] if start >= 0 else prompt


def read_split(path: Path, task: str) -> list[Example]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read TRACE JSON ({err})") from None
    if not isinstance(records, list):
        raise DataError(f'{path}: expected a JSON list of {{"prompt", "answer"}} objects (TRACE format)')
    examples = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "prompt" not in rec or "answer" not in rec:
            raise DataError(
                f"{path}: record {i} lacks 'prompt' or 'answer' (TRACE format is [{{\"prompt\", \"answer\"}}, ...])"
            )
        prompt, answer = str(rec["prompt"]), str(rec["answer"])
        examples.append(
            Example(id=f"{task}-{path.stem}-{i}", prompt=prompt, target=answer, source=_source_of(task, prompt))
        )
    return examples


def _check_labels(task: str, labels: list[str], examples: list[Example], folder: Path) -> None:
    """Every answer of a multiple-choice task must name an option, else accuracy would be 0
    for reasons that have nothing to do with the model."""
    for ex in examples:
        if chosen_label(ex.target, labels) is None:
            raise DataError(
                f"{folder}: TRACE {task} answer {ex.target[:60]!r} ({ex.id}) names none of the options "
                f"{', '.join(labels)}; expected an answer starting with the option letter or 'Answer: <letter>'"
            )


def load_task(name: str, *, root: str | None, n_train: int | None, n_eval: int, seed: int) -> TaskData:
    task = resolve_task_name(str(name))
    metric, labels = TASK_METRICS[task]
    tried: list[str] = []
    for base in data_roots(root):
        for folder in candidate_dirs(task, base):
            tried.append(str(folder / "train.json"))
            if not (folder / "train.json").is_file():
                continue
            train_pool = read_split(folder / "train.json", task)
            eval_file = next((folder / f for f in ("test.json", "eval.json") if (folder / f).is_file()), None)
            test_pool = read_split(eval_file, task) if eval_file else None
            if labels:
                _check_labels(task, labels, train_pool + (test_pool or []), folder)
            train, evaluated, info = split_for_task(train_pool, test_pool, n_train, n_eval, seed, eval_file)
            if eval_file:
                info["eval_file"] = eval_file.name
            return TaskData(
                task,
                metric,
                train,
                evaluated,
                labels=labels,
                origin=str(folder),
                info={"family": "trace", **info},
                paper_metric="slice_rouge_l",
            )
    where = "; ".join(tried) if tried else "no local path (data.root and CL_BENCH_DATA are unset)"
    raise DataError(f"TRACE task {task!r} not found. Tried: {where}. To get it: " + DOWNLOAD_HINT.format(task=task))

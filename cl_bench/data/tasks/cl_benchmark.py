"""Standard / Long CL benchmark (the 15 classification sets of O-LoRA, Wang et al. 2023).

Layout as the O-LoRA repo ships it: `CL_Benchmark/<group>/<name>/{train,dev,test,labels}.json`
(records `{"label", "sentence"}`, labels.json = the label list) plus the zero-shot instruction
templates in `instruction_config.json` (keyed by group). Looked up below `data.root` as
cl_benchmark/<name>, CL_Benchmark/<group>/<name>, <group>/<name> and <name>. There is no
official HF Hub copy, so there is no Hub fallback.

Prompt, in O-LoRA's format: <group instruction> + "Option: " + labels joined by ", " + " \\n" +
sentence + "\\nAnswer:" (COPA has no instruction: its sentence already asks for A or B).
Eval examples come from test.json (else dev.json, else held out of train.json); the metric is
exact match on the label as O-LoRA scores it: its src/compute_metrics.py is the natural-instructions
scorer (normalize_answer: lowercase, punctuation removed, whitespace collapsed), i.e. ni_exact_match.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...infra.errors import DataError
from .base import Example, TaskData, data_roots, split_for_task

# name -> instruction group (the O-LoRA task configs)
GROUPS: dict[str, str] = {
    "dbpedia": "TC",
    "amazon": "SC",
    "yahoo": "TC",
    "agnews": "TC",
    "yelp": "SC",
    "MNLI": "NLI",
    "QQP": "QQP",
    "RTE": "NLI",
    "SST-2": "SC",
    "WiC": "WiC",
    "CB": "NLI",
    "COPA": "COPA",
    "BoolQA": "BoolQA",
    "MultiRC": "MultiRC",
    "IMDB": "SC",
}
ALIASES = {"ag": "agnews", "ag_news": "agnews", "sst2": "SST-2", "boolq": "BoolQA"}
NO_INSTRUCTION = {"COPA"}
INSTRUCTION_FILE = "instruction_config.json"

DOWNLOAD_HINT = (
    "copy CL_Benchmark/<group>/{task}/ and configs/instruction_config.json from https://github.com/cmnfriend/O-LoRA "
    "to <data.root>/cl_benchmark/{task}/ and <data.root>/cl_benchmark/instruction_config.json, then set "
    "data.root=<dir> or env CL_BENCH_DATA=<dir>"
)


def resolve_task_name(name: str) -> str:
    key = name.strip()
    key = ALIASES.get(key.lower(), key)
    by_lower = {n.lower(): n for n in GROUPS}
    if key.lower() in by_lower:
        return by_lower[key.lower()]
    raise DataError(
        f"CL-benchmark task {name!r} is unknown; valid: {', '.join(GROUPS)} (aliases: {', '.join(ALIASES)})"
    )


def candidate_dirs(task: str, base: Path) -> list[Path]:
    group = GROUPS[task]
    return [base / "cl_benchmark" / task, base / "CL_Benchmark" / group / task, base / group / task, base / task]


def find_instructions(task_dir: Path, base: Path) -> Path | None:
    for place in (task_dir.parent, task_dir.parent.parent, base / "configs", base / "cl_benchmark", base):
        if (place / INSTRUCTION_FILE).is_file():
            return place / INSTRUCTION_FILE
    return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read JSON ({err})") from None


def instruction_for(task: str, config_path: Path | None, task_dir: Path) -> str:
    if task in NO_INSTRUCTION:
        return ""
    group = GROUPS[task]
    if config_path is None:
        raise DataError(
            f"CL-benchmark task {task!r}: no {INSTRUCTION_FILE} next to {task_dir} or under data.root; "
            f"copy configs/{INSTRUCTION_FILE} from https://github.com/cmnfriend/O-LoRA to <data.root>/cl_benchmark/"
        )
    config = _read_json(config_path)
    zero_shot = [e.get("instruction") for e in config.get(group, []) if e.get("instruction_type") == "zero-shot"]
    if not zero_shot or not isinstance(zero_shot[0], str):
        raise DataError(f"{config_path}: no zero-shot instruction for group {group!r} (needed by task {task!r})")
    return zero_shot[0]


def build_prompt(instruction: str, labels: list[str], sentence: str, with_options: bool = True) -> str:
    if not with_options:
        return f"{sentence}\nAnswer:"
    return f"{instruction}Option: {', '.join(labels)} \n{sentence}\nAnswer:"


def read_split(path: Path, task: str, instruction: str, labels: list[str]) -> tuple[list[Example], int]:
    """Examples of one split and the number of records skipped because their label is not in
    the label set (upstream MNLI test has unlabelled "-" records; no answer could score)."""
    records = _read_json(path)
    if not isinstance(records, list):
        raise DataError(f'{path}: expected a JSON list of {{"label", "sentence"}} records (O-LoRA CL_Benchmark format)')
    with_options = task not in NO_INSTRUCTION
    examples, skipped = [], 0
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "sentence" not in rec or "label" not in rec:
            raise DataError(f"{path}: record {i} lacks 'sentence' or 'label' (O-LoRA CL_Benchmark format)")
        label = str(rec["label"])
        if label not in labels:
            skipped += 1
            continue
        sentence = str(rec["sentence"])
        prompt = build_prompt(instruction, labels, sentence, with_options)
        end = len(prompt) - len("\nAnswer:")  # the sentence: what a too-long prompt may lose
        span = (end - len(sentence), end)
        examples.append(Example(id=f"{task}-{path.stem}-{i}", prompt=prompt, target=label, input_span=span))
    if records and not examples:
        raise DataError(f"{path}: no record has a label from labels.json ({', '.join(labels)})")
    return examples, skipped


def load_task(name: str, *, root: str | None, n_train: int | None, n_eval: int, seed: int) -> TaskData:
    task = resolve_task_name(str(name))
    tried: list[str] = []
    for base in data_roots(root):
        for folder in candidate_dirs(task, base):
            tried.append(str(folder / "train.json"))
            if not (folder / "train.json").is_file():
                continue
            if not (folder / "labels.json").is_file():
                raise DataError(
                    f"{folder}: labels.json is missing (O-LoRA CL_Benchmark layout: train/test/labels.json)"
                )
            labels = [str(x) for x in _read_json(folder / "labels.json")]
            config_path = find_instructions(folder, base)
            instruction = instruction_for(task, config_path, folder)
            train_pool, skipped = read_split(folder / "train.json", task, instruction, labels)
            eval_file = next((folder / f for f in ("test.json", "dev.json") if (folder / f).is_file()), None)
            test_pool = None
            if eval_file:
                test_pool, skipped_eval = read_split(eval_file, task, instruction, labels)
                skipped += skipped_eval
            train, evaluated, info = split_for_task(train_pool, test_pool, n_train, n_eval, seed, eval_file)
            info.update(
                group=GROUPS[task], instructions=str(config_path) if config_path else None, skipped_unlabelled=skipped
            )
            if eval_file:
                info["eval_file"] = eval_file.name
            return TaskData(
                task,
                "ni_exact_match",
                train,
                evaluated,
                labels=labels,
                origin=str(folder),
                info={"family": "cl_benchmark", **info},
            )
    where = "; ".join(tried) if tried else "no local path (data.root and CL_BENCH_DATA are unset)"
    raise DataError(
        f"CL-benchmark task {task!r} not found. Tried: {where}. To get it: " + DOWNLOAD_HINT.format(task=task)
    )

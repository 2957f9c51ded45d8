"""Data side of the general-capability benchmarks (GP/IP): rows and lm-eval task YAMLs.

Two kinds of data end up as lm-eval tasks written under the run directory:
- `synthetic_general`: two families generated here, deterministic by seed, that no CL task
  trains on (odd-one-out, multiple choice; counting the words of a list, generated). They let
  GP/IP run on the tiny model with nothing downloaded.
- local copies of real benchmarks (CommonsenseQA, HellaSwag, BBH object counting, AlpacaEval):
  read from `data.root/general`, checked, and rewritten as JSONL with a few-shot pool split
  off, so lm-eval sees the schema its own task expects.

The task YAMLs include either lm-eval's own task file (only the data source changes, so the
prompt is the registry's) or a template in `cl_bench/evaluation/general/lm_eval_tasks/`. lm-eval resolves relative
data paths against the process working directory, so every path written here is absolute.
No model code here.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ...data.wordlists import COLORS, NAMES, NOUNS
from ...infra.errors import DataError
from ..scoring import rouge_l as _rouge_l_f1

TEMPLATE_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"

# Word categories for odd-one-out; every word is in the tiny model's pretraining vocabulary.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": tuple("cat dog bird fish horse cow sheep goat lion tiger bear wolf fox mouse frog duck".split()),
    "food": tuple("apple bread cheese soup cake rice milk tea coffee juice pizza salad".split()),
    "nature": tuple("river lake hill tree flower stone cloud rain snow sun moon star".split()),
    "object": tuple(
        "book pen cup door window chair table lamp clock phone shoe hat coat bag box key ring ball".split()
    ),
    "color": tuple(COLORS),
    "name": tuple(NAMES),
}


# ---------------------------------------------------------------------------- synthetic_general
def odd_one_out_row(rng: random.Random) -> dict:
    """Three words of one category and one intruder; the answer is the intruder's index."""
    group, other = rng.sample(sorted(CATEGORIES), 2)
    words = rng.sample(CATEGORIES[group], 3) + [rng.choice(CATEGORIES[other])]
    order = list(range(4))
    rng.shuffle(order)
    choices = [words[i] for i in order]
    return {
        "question": "Which word does not belong with the others: " + ", ".join(choices) + "?",
        "choices": choices,
        "answer": order.index(3),
    }


def count_items_row(rng: random.Random) -> dict:
    # The tiny model's pretraining chats ask this only about 3-word lists, so a model that keeps
    # that habit scores ~1/5 here; counting itself is what a capable model adds.
    k = rng.randint(2, 6)
    items = rng.sample(NOUNS, k)
    return {"question": "How many words are in the list?\nList: " + " ".join(items), "answer": str(k)}


SYNTHETIC_FAMILIES: dict[str, Callable[[random.Random], dict]] = {
    "odd_one_out": odd_one_out_row,
    "count_items": count_items_row,
}


def synthetic_rows(family: str, seed: int, n_test: int, n_pool: int) -> tuple[list[dict], list[dict]]:
    """(few-shot pool, test) rows of one family; no question appears in both."""
    make = SYNTHETIC_FAMILIES[family]
    # Own stream per family, so adding a family never changes another's rows.
    rng = random.Random(f"{seed}:{family}")
    seen: set[str] = set()
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n_pool + n_test:
        attempts += 1
        if attempts > 100 * (n_pool + n_test):
            raise DataError(f"synthetic_general {family}: cannot draw {n_pool + n_test} distinct questions")
        row = make(rng)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return rows[:n_pool], rows[n_pool:]


# ---------------------------------------------------------------------------- local benchmark files
def read_json_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl file, a JSON list, or a JSON object holding them under "examples"."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            rows = data["examples"] if isinstance(data, dict) and "examples" in data else data
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read JSON rows ({exc})") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected a non-empty list of JSON objects (or {{'examples': [...]}})")
    return rows


def _require_keys(rows: Sequence[dict], keys: Sequence[str], path: Path, schema: str) -> None:
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise DataError(
                f"{path}: row {i} lacks {', '.join(missing)}; expected the {schema} schema ({', '.join(keys)})"
            )


def commonsense_qa_rows(path: Path) -> list[dict]:
    rows = read_json_rows(path)
    _require_keys(rows, ("question", "choices", "answerKey"), path, "HF tau/commonsense_qa")
    for i, row in enumerate(rows):
        if not isinstance(row["choices"], dict) or len(row["choices"].get("text", [])) != 5:
            raise DataError(
                f"{path}: row {i} 'choices' must be {{'label': [...5], 'text': [...5]}} (HF tau/commonsense_qa)"
            )
    return rows


def hellaswag_rows(path: Path) -> list[dict]:
    rows = read_json_rows(path)
    _require_keys(rows, ("activity_label", "ctx_a", "ctx_b", "endings", "label"), path, "HF Rowan/hellaswag")
    # lm-eval's process_docs does int(label); HF stores it as a string.
    return [{**row, "label": str(row["label"])} for row in rows]


def bbh_rows(path: Path) -> list[dict]:
    rows = read_json_rows(path)
    _require_keys(rows, ("input", "target"), path, "BIG-Bench-Hard")
    return [{"input": r["input"], "target": str(r["target"])} for r in rows]


def alpaca_rows(path: Path) -> list[dict]:
    """AlpacaEval ({instruction, output}) or Alpaca ({instruction, input, output}) rows."""
    rows = read_json_rows(path)
    _require_keys(rows, ("instruction", "output"), path, "Alpaca/AlpacaEval")
    return [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in rows]


def seeded_split(rows: Sequence[dict], n_pool: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(few-shot pool, test): a seeded shuffle, the first `n_pool` rows become demonstrations.
    The test rows stay in shuffled order, so lm-eval's "first N docs" limit is a random sample."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_pool = min(n_pool, len(rows) // 2)
    return [rows[i] for i in idx[:n_pool]], [rows[i] for i in idx[n_pool:]]


def drop_scored_prompts(pool: Sequence[dict], test: Sequence[dict], fields: Sequence[str]) -> tuple[list[dict], int]:
    """Pool rows whose prompt fields equal a scored row's (a duplicated document in the file),
    removed: as a demonstration it would show the scored document's answer. Returns (pool, n dropped)."""
    if not fields:
        return list(pool), 0

    def key(row: dict) -> str:
        return json.dumps([row.get(f) for f in fields], sort_keys=True, ensure_ascii=False)

    scored = {key(r) for r in test}
    kept = [r for r in pool if key(r) not in scored]
    return kept, len(pool) - len(kept)


# ---------------------------------------------------------------------------- lm-eval task files
def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path.resolve()


def task_yaml(
    task: str, include: Path, data_files: dict[str, Path], cache_dir: Path, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An lm-eval task that inherits everything from `include` and reads `data_files` (absolute)."""
    return {
        "include": str(Path(include).resolve()),
        "task": task,
        "tag": [],  # do not join the included task's tags (e.g. hellaswag's "multiple_choice")
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {split: str(Path(p).resolve()) for split, p in data_files.items()},
            "cache_dir": str(Path(cache_dir).resolve()),
        },
        **(extra or {}),
    }


def write_task_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path.resolve()


# ---------------------------------------------------------------------------- metric used by lm-eval
def rouge_l(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Per-document ROUGE-L F1 in lm-eval's metric-function signature (lm-eval has no ROUGE-L of
    its own for generate_until), the best over the document's references; the score comes from
    `rouge_score` (by script for non-ASCII text) via cl_bench.evaluation.scoring."""
    return max(_rouge_l_f1(predictions[0].strip(), ref.strip()) for ref in references)

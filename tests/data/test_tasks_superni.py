"""SuperNI loader: both file layouts, prompts, the metric table, the split rule, missing data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cl_bench.data.prompts import TrainingEncoder, encode_for_training, render_prompt_ids
from cl_bench.data.tasks import superni
from cl_bench.data.tasks.base import VALID_METRICS
from cl_bench.infra.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="module")
def shared_data() -> Path:
    if not (SHARED_DATA / "superni").is_dir():
        pytest.skip(f"real SuperNI samples not found at {SHARED_DATA}/superni (an optional data folder)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def tiny_tokenizer(request):
    from transformers import AutoTokenizer

    try:
        model_dir = request.getfixturevalue("tiny_model_dir")
    except pytest.FixtureLookupError:
        from cl_bench.data.tiny_model import ensure_tiny_model

        model_dir = ensure_tiny_model()
    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """The Hub fallback must never reach the network in tests."""
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline in tests")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("CL_BENCH_DATA", raising=False)


def write_task(path: Path, n: int, definition="Say the word.", outputs_as_list=True, prefix="w") -> None:
    instances = []
    for i in range(n):
        out = f"{prefix}{i}"
        instances.append(
            {"id": f"t-{prefix}{i}", "input": f"word {prefix}{i}", "output": [out, "alt"] if outputs_as_list else out}
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"Definition": [definition], "Positive Examples": [], "Instances": instances}))


# ------------------------------------------------------------------------ formats


def test_per_task_json_prompt_target_and_split(tmp_path):
    name = "task088_identify_typo_verification"
    write_task(tmp_path / "superni" / f"{name}.json", 20)
    task = superni.load_task(name, root=str(tmp_path), n_train=None, n_eval=200, seed=42)
    assert task.metric == "ni_exact_match"  # exact match by the natural-instructions rules
    # Small task: eval holds out half, never more.
    assert len(task.eval) == 10 and len(task.train) == 10
    ex = task.train[0]
    i = ex.id.removeprefix("t-w")
    assert ex.prompt == f"Say the word.\n\nInput: word w{i}"
    assert ex.target == f"w{i}"  # trained on the first reference
    assert ex.references == (f"w{i}", "alt")  # scored against all of them
    assert task.info["eval_from"] == "held out of the training file"


def test_instances_without_output_are_skipped(tmp_path):
    name = "task363_sst2_polarity_classification"
    path = tmp_path / f"{name}.json"
    write_task(path, 6)
    raw = json.loads(path.read_text())
    raw["Instances"][0]["output"] = []
    path.write_text(json.dumps(raw))
    task = superni.load_task(name, root=str(tmp_path), n_train=None, n_eval=2, seed=0)
    assert len(task.train) + len(task.eval) == 5


def test_cl_repo_layout_uses_its_test_file_and_drops_overlap(tmp_path):
    name = "task1290_xsum_summarization"
    folder = tmp_path / "CL_Benchmark" / "SuperNI" / name
    write_task(folder / "train.json", 30, outputs_as_list=False, prefix="a")
    write_task(folder / "test.json", 8, outputs_as_list=False, prefix="b")
    # One training instance repeats an evaluated prompt: it must not be trained on.
    train = json.loads((folder / "train.json").read_text())
    test = json.loads((folder / "test.json").read_text())
    train["Instances"].append(dict(test["Instances"][0], id="dup"))
    (folder / "train.json").write_text(json.dumps(train))
    task = superni.load_task(name, root=str(tmp_path), n_train=None, n_eval=100, seed=42)
    assert task.metric == "ni_rouge_l"
    assert {e.target for e in task.eval} == {f"b{i}" for i in range(8)}
    assert len(task.train) == 30 and all(e.target.startswith("a") for e in task.train)
    assert task.info == {"family": "superni", "eval_from": "test file", "dropped_duplicates": 1}
    assert task.split_stats == {"train": 30, "eval": 8, "dropped_duplicates": 1}


def test_malformed_file_names_path_and_key(tmp_path):
    name = "task088_identify_typo_verification"
    (tmp_path / f"{name}.json").write_text(json.dumps({"Instances": [{"input": "x", "output": ["y"]}]}))
    with pytest.raises(DataError, match="Definition"):
        superni.load_task(name, root=str(tmp_path), n_train=None, n_eval=2, seed=0)


# ------------------------------------------------------------------------ real samples


def test_real_natural_instructions_file(shared_data):
    task = superni.load_task(
        "task088_identify_typo_verification", root=str(shared_data), n_train=None, n_eval=200, seed=42
    )
    raw = json.loads((shared_data / "superni" / "task088_identify_typo_verification.json").read_text())
    by_id = {inst["id"]: inst for inst in raw["Instances"]}
    assert len(task.train) + len(task.eval) == len(raw["Instances"]) == 62
    for ex in task.train + task.eval:
        inst = by_id[ex.id]
        assert ex.prompt == raw["Definition"][0].strip() + "\n\nInput: " + inst["input"]
        assert ex.target == inst["output"][0]


def test_real_sapt_sample_with_test_file(shared_data):
    task = superni.load_task(
        "task363_sst2_polarity_classification", root=str(shared_data), n_train=64, n_eval=50, seed=42
    )
    assert len(task.train) == 64 and len(task.eval) == 50
    assert {e.target for e in task.eval} <= {"POS", "NEG"}
    assert task.info["eval_from"] == "test file"
    test_ids = {
        i["id"]
        for i in json.loads((shared_data / "superni" / "task363_sst2_polarity_classification.test.json").read_text())[
            "Instances"
        ]
    }
    assert {e.id for e in task.eval} <= test_ids
    assert not {e.id for e in task.train} & test_ids


def test_short_ids_resolve_to_full_names(shared_data):
    for short in ("task088", "088", "NI088", "88"):
        assert superni.resolve_task_name(short) == "task088_identify_typo_verification"
    task = superni.load_task("1510", root=str(shared_data), n_train=8, n_eval=4, seed=42)
    assert task.name == "task1510_evalution_relation_extraction"


# ------------------------------------------------------------------------ split rule


def test_split_is_seeded_disjoint_and_eval_does_not_depend_on_n_train(shared_data):
    name = "task1510_evalution_relation_extraction"
    a = superni.load_task(name, root=str(shared_data), n_train=None, n_eval=40, seed=42)
    b = superni.load_task(name, root=str(shared_data), n_train=16, n_eval=40, seed=42)
    c = superni.load_task(name, root=str(shared_data), n_train=None, n_eval=40, seed=7)
    assert [e.id for e in a.eval] == [e.id for e in b.eval]
    assert [e.id for e in b.train] == [e.id for e in a.train][:16]
    assert [e.id for e in a.eval] != [e.id for e in c.eval]
    for task in (a, b, c):
        assert not {e.prompt for e in task.train} & {e.prompt for e in task.eval}
    held = superni.load_task(
        "task243_count_elements_in_set_intersection", root=str(shared_data), n_train=None, n_eval=200, seed=42
    )
    assert not {e.id for e in held.train} & {e.id for e in held.eval}
    assert len(held.eval) == 24 and len(held.train) == 24


def test_training_batches_never_contain_eval_examples(shared_data, tiny_tokenizer):
    task = superni.load_task(
        "task088_identify_typo_verification", root=str(shared_data), n_train=None, n_eval=200, seed=42
    )
    encoder = TrainingEncoder(tiny_tokenizer, max_len=256)
    train_rows = {tuple(e.input_ids) for e in encoder.encode_task(task)}
    eval_rows = {tuple(encode_for_training(tiny_tokenizer, ex, 256).input_ids) for ex in task.eval}
    assert not train_rows & eval_rows
    seen = 0
    for batch in encoder.batches(task, n_batches=12, batch_size=4, seed=3):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            row = tuple(ids[mask.bool()].tolist())
            assert row in train_rows and row not in eval_rows
            seen += 1
    assert seen == 48


# ------------------------------------------------------------------------ prompt through the chat template


def test_prompt_goes_through_the_chat_template_with_one_bos(shared_data, tiny_tokenizer):
    task = superni.load_task(
        "task363_sst2_polarity_classification", root=str(shared_data), n_train=4, n_eval=4, seed=42
    )
    ex = task.train[0]
    ids = render_prompt_ids(tiny_tokenizer, ex)
    bos = tiny_tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    text = tiny_tokenizer.decode(ids)
    assert "Input: " in text and text.index("Input: ") > text.index("classify")
    assert text.rstrip().endswith("<|assistant|>")
    encoded = encode_for_training(tiny_tokenizer, ex, max_len=512)
    answer = [t for t, l in zip(encoded.input_ids, encoded.labels) if l != -100]
    assert answer[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(answer[:-1]).strip() == ex.target


# ------------------------------------------------------------------------ metric table


def test_metric_table_values_and_known_output_kinds():
    assert set(superni.METRIC_TABLE.values()) <= set(VALID_METRICS)
    label_tasks = [
        "task088_identify_typo_verification",
        "task1510_evalution_relation_extraction",
        "task363_sst2_polarity_classification",
        "task141_odd-man-out_classification_category",
        "task243_count_elements_in_set_intersection",
        "task163_count_words_ending_with_letter",
        "task1429_evalution_semantic_relation_classification",
        "task611_mutual_multi_turn_dialogue",
    ]
    text_tasks = [
        "task1290_xsum_summarization",
        "task618_amazonreview_summary_text_generation",
        "task360_spolin_yesand_response_generation",
        "task1357_xlsum_summary_generation",
    ]
    assert all(superni.METRIC_TABLE[t] == "exact_match" for t in label_tasks)
    assert all(superni.METRIC_TABLE[t] == "rouge_l" for t in text_tasks)
    # NI488 is the alphabetical-elements task, not the task448 translation the SLICE registry used.
    assert "task488_extract_all_alphabetical_elements_from_list_in_order" in superni.METRIC_TABLE
    assert not any(t.startswith("task448") for t in superni.METRIC_TABLE)


def test_sample_label_tasks_really_have_short_outputs(shared_data):
    """The table's EM entries checked against the samples: EM tasks answer in a few words."""
    for path in sorted((shared_data / "superni").glob("task*.json")):
        name = path.name.split(".")[0]
        if name not in superni.METRIC_TABLE or superni.METRIC_TABLE[name] != "exact_match":
            continue
        outputs = [
            i["output"][0] if isinstance(i["output"], list) else i["output"]
            for i in json.loads(path.read_text())["Instances"]
        ]
        mean_words = sum(len(o.split()) for o in outputs) / len(outputs)
        assert mean_words <= 6, (name, mean_words)


def test_unknown_task_asks_for_a_table_entry(tmp_path):
    write_task(tmp_path / "task9999_made_up.json", 6)
    with pytest.raises(DataError, match="METRIC_TABLE"):
        superni.load_task("task9999_made_up", root=str(tmp_path), n_train=None, n_eval=2, seed=0)
    task = superni.load_task("task9999_made_up", root=str(tmp_path), n_train=None, n_eval=2, seed=0, metric="rouge_l")
    assert task.metric == "ni_rouge_l"
    with pytest.raises(DataError, match="valid"):
        superni.load_task("task9999_made_up", root=str(tmp_path), n_train=None, n_eval=2, seed=0, metric="bleu")


# ------------------------------------------------------------------------ missing data / Hub fallback


def test_missing_task_message_names_task_paths_and_how_to_get_it(tmp_path):
    name = "task611_mutual_multi_turn_dialogue"
    with pytest.raises(DataError) as info:
        superni.load_task(name, root=str(tmp_path), n_train=None, n_eval=200, seed=42)
    msg = str(info.value)
    assert "\n" not in msg
    assert name in msg
    assert str(tmp_path / "superni" / f"{name}.json") in msg
    assert "github.com/allenai/natural-instructions" in msg and "data.root" in msg and "CL_BENCH_DATA" in msg
    assert superni.HF_DATASET in msg and "offline in tests" in msg


def test_no_root_says_data_root_is_unset():
    with pytest.raises(DataError, match="data.root and CL_BENCH_DATA are unset"):
        superni.load_task("task088_identify_typo_verification", root=None, n_train=None, n_eval=10, seed=42)


def test_env_var_is_the_default_root(tmp_path, monkeypatch):
    write_task(tmp_path / "superni" / "task088_identify_typo_verification.json", 8)
    monkeypatch.setenv("CL_BENCH_DATA", str(tmp_path))
    task = superni.load_task("task088_identify_typo_verification", root=None, n_train=None, n_eval=2, seed=42)
    assert task.origin.startswith(str(tmp_path))


def test_hub_fallback_reads_the_natural_instructions_dataset(tmp_path, monkeypatch):
    import datasets

    rows = {
        "task_name": ["task088_identify_typo_verification"] * 6 + ["task363_sst2_polarity_classification"],
        "id": [f"id{i}" for i in range(7)],
        "definition": ["Find the typo."] * 7,
        "inputs": [f"sentence {i}" for i in range(7)],
        "targets": [f"typo{i}" for i in range(7)],
    }
    calls = []

    def fake_load_dataset(name, *args, **kwargs):
        calls.append(name)
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = superni.load_task("task088_identify_typo_verification", root=str(tmp_path), n_train=None, n_eval=2, seed=42)
    assert calls == [superni.HF_DATASET]
    assert task.origin == f"hf:{superni.HF_DATASET}"
    assert len(task.train) + len(task.eval) == 6
    ex = task.eval[0]
    assert ex.prompt == f"Find the typo.\n\nInput: sentence {ex.id[2:]}" and ex.target == f"typo{ex.id[2:]}"


# ------------------------------------------------------------------------ through the runner


def test_runner_names_the_sequence_task_missing_from_the_samples(shared_data, tmp_path):
    from cl_bench.run.runner import run
    from helpers import compose

    cfg = compose(["sequence=ni_opp1", f"data.root={shared_data}", "general_eval=none", "progress=false"])
    with pytest.raises(DataError, match="task611_mutual_multi_turn_dialogue' not found") as info:
        run(cfg, tmp_path)
    assert "natural-instructions" in str(info.value)
    assert not (tmp_path / "results.json").exists()  # failed before any work


@pytest.mark.slow
def test_end_to_end_run_on_real_samples(shared_data, tiny_model_dir, tmp_path):
    from cl_bench.run.runner import run
    from helpers import FAST, compose

    tasks = ["task088_identify_typo_verification", "task363_sst2_polarity_classification"]
    cfg = compose(FAST + ["sequence=ni_samples", f"sequence.tasks=[{','.join(tasks)}]", f"data.root={shared_data}"])
    results = run(cfg, tmp_path)
    assert results["complete"] is True and results["tasks"] == tasks
    assert len(results["matrix"]) == 3 and all(len(row) == 2 for row in results["matrix"])
    test_ids = {
        i["id"] for i in json.loads((shared_data / "superni" / f"{tasks[1]}.test.json").read_text())["Instances"]
    }
    for stage in range(3):
        for name in tasks:
            lines = (tmp_path / "predictions" / f"stage_{stage:02d}" / f"{name}.jsonl").read_text().splitlines()
            assert len(lines) == 8
    records = [
        json.loads(x) for x in (tmp_path / "predictions" / "stage_02" / f"{tasks[1]}.jsonl").read_text().splitlines()
    ]
    assert all("\n\nInput: " in r["prompt"] and r["target"] in ("POS", "NEG") for r in records)
    assert {r["id"] for r in records} <= test_ids  # scored examples come from the test file


# ------------------------------------------------------------------------ official scoring


def test_task002_every_reference_scores_by_the_official_rules(shared_data):
    """task002 (Quoref) lists several valid answers per instance: the natural-instructions
    scorer takes the best one. Predicting each instance's *last* reference is 100% correct."""
    from cl_bench.evaluation.scoring import score

    task = superni.load_task("task002_quoref_answer_generation", root=str(shared_data), n_train=8, n_eval=100, seed=42)
    assert task.metric == "ni_exact_match" and task.metric_for("slice_paper") == "slice_rouge_l"
    multi = [e for e in task.eval if len(e.references) > 1]
    assert len(multi) == 17  # of the 100 test instances
    per_task = [score(task.metric, e.references[-1], e.all_references) for e in task.eval]
    first_only = [score(task.metric, e.references[-1], e.target) for e in task.eval]
    assert sum(per_task) == 100
    assert sum(first_only) == 100 - sum(e.references[-1] != e.target for e in task.eval) == 83
    raw = json.loads((shared_data / "superni" / "task002_quoref_answer_generation.test.json").read_text())
    by_id = {inst["id"]: inst["output"] for inst in raw["Instances"]}
    assert all(list(e.references) == by_id[e.id] for e in task.eval)


def test_slice_paper_metric_follows_the_authors_registry():
    # classification in their registry -> exact match; generation -> ROUGE-L (even for NI141 and
    # NI163, which answer with one word or a number); NI360 they registered as classification.
    assert superni.paper_metric_for("task088_identify_typo_verification", "exact_match") == "slice_exact_match"
    assert superni.paper_metric_for("task141_odd-man-out_classification_category", "exact_match") == "slice_rouge_l"
    assert superni.paper_metric_for("task163_count_words_ending_with_letter", "exact_match") == "slice_rouge_l"
    assert superni.paper_metric_for("task360_spolin_yesand_response_generation", "rouge_l") == "slice_exact_match"
    # a task they never registered maps by its kind
    assert superni.paper_metric_for("task875_emotion_classification", "exact_match") == "slice_exact_match"
    assert superni.paper_metric_for("task1572_samsum_summary", "rouge_l") == "slice_rouge_l"

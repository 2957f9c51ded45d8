"""GP/IP through lm-eval: config checks, aggregation, prompts equal to lm-eval's registry tasks,
Alpaca ROUGE-L, batch size reaching HFLM, offline operation, and state left as found."""

from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path

import pytest
import torch
import yaml

from cl_bench.evaluation import general as ge
from cl_bench.evaluation.general import tasks as gt
from cl_bench.infra.errors import ConfigError, DataError

CONF = Path(__file__).resolve().parents[2] / "conf" / "general_eval"
REGISTRY_BENCHMARKS = ("hellaswag", "commonsense_qa", "bbh_object_counting")
SHARED_GENERAL = (
    "commonsenseqa_validation.jsonl",
    "bbh_object_counting.json",
    "alpaca_eval_text_davinci_003_reference.json",
)


def _conf(name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))


def _cfg(benchmarks: dict, **top) -> dict:
    return {
        "when": "stage0_and_final",
        "batch_size": 4,
        "limit": None,
        "fewshot_pool": 10,
        "benchmarks": benchmarks,
        **top,
    }


# Invented rows in HF Rowan/hellaswag's schema (the real-data sample folder holds no HellaSwag file).
def _hellaswag_rows(n: int) -> list[dict]:
    rng = random.Random(7)
    acts = ["Making tea", "Washing a car", "Painting a fence", "Walking a dog", "Baking bread"]
    rows = []
    for i in range(n):
        act = acts[i % len(acts)]
        endings = [
            f"then {w} the {rng.choice(['cup', 'wall', 'road', 'bowl'])} slowly."
            for w in ("lifts", "paints", "drops", "fills")
        ]
        rows.append(
            {
                "ind": i,
                "activity_label": act,
                "ctx_a": f"A person starts {act.lower()} [title] step {i}.",
                "ctx_b": "she",
                "ctx": f"A person starts {act.lower()} step {i}. she",
                "endings": endings,
                "source_id": f"synthetic~{i}",
                "split": "val",
                "split_type": "indomain",
                "label": str(i % 4),
            }
        )
    return rows


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, shared_data):
    """data.root with general/: links to the shared samples plus a written HellaSwag file."""
    root = tmp_path_factory.mktemp("data_root")
    general = root / "general"
    general.mkdir()
    for name in SHARED_GENERAL:
        (general / name).symlink_to(Path(shared_data) / "general" / name)
    gt.write_jsonl(general / "hellaswag_validation.jsonl", _hellaswag_rows(40))
    return root


@pytest.fixture(scope="module")
def own_tiny(tiny_model_dir):
    """A private copy of the tiny model: these tests switch it to train mode and back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return model, tokenizer


# ---------------------------------------------------------------------------- config
def test_shipped_configs_parse():
    syn, paper, none = (ge.parse_config(_conf(n)) for n in ("synthetic", "paper", "none"))
    assert syn.gp_benchmarks == syn.ip_benchmarks == ["synthetic_odd_one_out", "synthetic_count_items"]
    # Paper App. D: BBH is in IP only (its zero-shot is the ~0 score the authors' GP included).
    assert paper.gp_benchmarks == ["hellaswag", "commonsense_qa", "alpaca"]
    assert paper.ip_benchmarks == ["hellaswag", "commonsense_qa", "alpaca", "bbh_object_counting"]
    assert {b.name: b.shots for b in paper.benchmarks} == {
        "hellaswag": 5,
        "commonsense_qa": 5,
        "alpaca": 5,
        "bbh_object_counting": 3,
    }
    assert {b.name: b.metric for b in paper.benchmarks} == {
        "hellaswag": "acc_norm,none",
        "commonsense_qa": "acc,none",
        "alpaca": "rouge_l,none",
        "bbh_object_counting": "exact_match,get-answer",
    }
    assert none.when == "none" and none.benchmarks == ()


@pytest.mark.parametrize(
    "cfg, culprit",
    [
        (_cfg({"mmlu": {}}), "general_eval.benchmarks.mmlu"),
        (_cfg({"commonsense_qa": {}}, when="sometimes"), "general_eval.when='sometimes'"),
        (_cfg({"commonsense_qa": {}}, batchsize=4), "general_eval.batchsize"),
        (_cfg({"commonsense_qa": {"source": "synthetic"}}), "general_eval.benchmarks.commonsense_qa.source"),
        (_cfg({"alpaca": {"source": "registry"}}), "general_eval.benchmarks.alpaca.source"),
        (_cfg({"commonsense_qa": {"shots": 0}}), "general_eval.benchmarks.commonsense_qa.shots=0"),
        (_cfg({"commonsense_qa": {"gp": False, "ip": False}}), "general_eval.benchmarks.commonsense_qa"),
        (_cfg({"commonsense_qa": {"metric": "acc"}}), "general_eval.benchmarks.commonsense_qa.metric='acc'"),
        (_cfg({"commonsense_qa": {"task": "x"}}), "general_eval.benchmarks.commonsense_qa.task='x'"),
        (_cfg({"commonsense_qa": {}}, batch_size=0), "general_eval.batch_size=0"),
        (_cfg({}), "general_eval.benchmarks"),
    ],
)
def test_bad_config_is_one_line_config_error(cfg, culprit):
    with pytest.raises(ConfigError) as err:
        ge.parse_config(cfg)
    message = str(err.value)
    assert culprit in message and "\n" not in message


def test_chat_template_asked_of_a_tokenizer_without_one_is_one_line_config_error(tmp_path):
    """Caught before lm-eval, which would fail mid-run with its own traceback."""
    from types import SimpleNamespace

    tokenizer = SimpleNamespace(chat_template=None, name_or_path="/models/base-model")
    with pytest.raises(
        ConfigError, match="tokenizer of /models/base-model has no chat template.*apply_chat_template=false"
    ):
        ge.evaluate_general(
            None, tokenizer, _conf("synthetic"), data_root=None, work_dir=str(tmp_path), device="cpu", seed=0
        )


def test_should_run_follows_when():
    def stages(when):
        return [s for s in range(4) if ge.should_run(_cfg({"commonsense_qa": {}}, when=when), s, 3)]

    assert stages("stage0_and_final") == [0, 3]
    assert stages("every_stage") == [0, 1, 2, 3]
    assert stages("none") == []


# ---------------------------------------------------------------------------- aggregation
def test_gp_ip_aggregation_at_final_stage():
    cfg = _conf("paper")
    stage0 = {
        "zero_shot": {"hellaswag": 30.0, "commonsense_qa": 20.0, "alpaca": 10.0},
        "few_shot": {"hellaswag": 40.0, "commonsense_qa": 30.0, "alpaca": 20.0, "bbh_object_counting": 10.0},
    }
    final = {
        "zero_shot": {"hellaswag": 27.0, "commonsense_qa": 21.0, "alpaca": 12.0},
        "few_shot": {"hellaswag": 35.0, "commonsense_qa": 25.0, "alpaca": 15.0, "bbh_object_counting": 5.0},
    }
    # Keys are stage numbers as strings: "10" is later than "9" (numeric, not string order).
    out = ge.aggregate_gp_ip({"0": stage0, "9": stage0, "10": final}, cfg)
    assert out["GP"] == pytest.approx((27 + 21 + 12) / 3)  # BBH zero-shot never enters GP
    assert out["IP"] == pytest.approx((35 + 25 + 15 + 5) / 4)
    assert ge.aggregate_gp_ip({"0": stage0}, cfg) == {"GP": pytest.approx(20.0), "IP": pytest.approx(25.0)}
    # A requested final stage that was not evaluated gives None, not an earlier stage's value.
    assert ge.aggregate_gp_ip({"0": stage0}, cfg, final_stage=3) == {"GP": None, "IP": None}
    # A listed benchmark without a score: None, never a mean over a silently shorter list.
    partial = {"zero_shot": {"hellaswag": 50.0, "commonsense_qa": 50.0}, "few_shot": final["few_shot"]}
    assert ge.aggregate_gp_ip({"3": partial}, cfg) == {"GP": None, "IP": pytest.approx(20.0)}
    assert ge.aggregate_gp_ip({}, cfg) == {"GP": None, "IP": None}


# ---------------------------------------------------------------------------- synthetic_general
def test_synthetic_general_is_deterministic_disjoint_and_correct():
    for family in gt.SYNTHETIC_FAMILIES:
        pool, test = gt.synthetic_rows(family, seed=3, n_test=150, n_pool=20)
        assert (pool, test) == gt.synthetic_rows(family, seed=3, n_test=150, n_pool=20)
        assert gt.synthetic_rows(family, seed=4, n_test=150, n_pool=20)[1] != test
        assert len(pool) == 20 and len(test) == 150
        assert not {r["question"] for r in pool} & {r["question"] for r in test}
    category_of = {w: c for c, words in gt.CATEGORIES.items() for w in words}
    for row in gt.synthetic_rows("odd_one_out", 0, 100, 0)[1]:
        cats = [category_of[w] for w in row["choices"]]
        odd = row["choices"][row["answer"]]
        assert cats.count(category_of[odd]) == 1 and len(set(cats)) == 2
    answers = set()
    for row in gt.synthetic_rows("count_items", 0, 100, 0)[1]:
        items = row["question"].split("\nList: ", 1)[1].split()
        assert row["answer"] == str(len(items))
        answers.add(row["answer"])
    assert len(answers) >= 5  # not a constant answer


def test_synthetic_words_are_in_the_tiny_model_vocabulary():
    from cl_bench.data.wordlists import COLORS, NAMES, NOUNS

    known = set(NOUNS) | set(COLORS) | set(NAMES)
    assert all(set(words) <= known for words in gt.CATEGORIES.values())


# ---------------------------------------------------------------------------- local data
def test_missing_local_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"general/alpaca_eval_text_davinci_003_reference\.json not found"):
        ge.check_data(_cfg({"alpaca": {}}), data_root=str(tmp_path))
    # No local file: local_or_registry falls back to lm-eval's registry task by name.
    assert ge.check_data(_cfg({"hellaswag": {}}), data_root=str(tmp_path)) == {"hellaswag": "registry"}
    bad = tmp_path / "general" / "commonsenseqa_validation.jsonl"
    gt.write_jsonl(bad, [{"question": "q", "answer": "a"}, {"question": "r", "answer": "b"}])
    with pytest.raises(DataError, match="lacks choices, answerKey"):
        ge.prepare_benchmarks(
            ge.parse_config(_cfg({"commonsense_qa": {"source": "local"}})),
            data_root=str(tmp_path),
            work_dir=tmp_path / "w",
            seed=0,
        )


def test_local_tasks_use_absolute_paths_and_disjoint_demonstrations(data_root, tmp_path):
    cfg = ge.parse_config(_conf("paper"))
    prepared = ge.prepare_benchmarks(cfg, data_root=str(data_root), work_dir=tmp_path, seed=1)
    assert {p.config.name: p.source.split(":")[0] for p in prepared} == {
        "hellaswag": "local",
        "commonsense_qa": "local",
        "alpaca": "local",
        "bbh_object_counting": "local",
    }
    for item in prepared:
        written = yaml.safe_load((tmp_path / "tasks" / f"{item.task}.yaml").read_text())
        assert Path(written["include"]).is_absolute() and Path(written["include"]).is_file()
        files = written["dataset_kwargs"]["data_files"]
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in files.values())
        if "train" in files:

            def ids(p):
                return {json.dumps(r, sort_keys=True) for r in gt.read_json_rows(Path(p))}

            eval_split = next(s for s in files if s != "train")
            assert not ids(files["train"]) & ids(files[eval_split])
    csqa = gt.read_json_rows(tmp_path / "tasks" / "clb_commonsense_qa.validation.jsonl")
    assert len(csqa) == 300 - 25  # paper.yaml fewshot_pool = 25 held apart from the scored rows


@pytest.mark.slow
def test_local_tasks_render_the_registry_prompts(data_root, tmp_path, monkeypatch):
    """Each local task, and lm-eval's registry task fed the same rows, render the same prompt."""
    import datasets
    import lm_eval.api.task
    from lm_eval.tasks import TaskManager

    cfg = ge.parse_config(_conf("paper"))
    prepared = {
        p.config.name: p for p in ge.prepare_benchmarks(cfg, data_root=str(data_root), work_dir=tmp_path, seed=1)
    }
    registry_files = {}  # registry task name -> the data files our local task reads
    for name in REGISTRY_BENCHMARKS:
        written = yaml.safe_load((tmp_path / "tasks" / f"{prepared[name].task}.yaml").read_text())
        registry_files[ge.BENCHMARKS[name].registry_task] = written["dataset_kwargs"]["data_files"]

    local_tm = ge.make_task_manager(list(prepared.values()), tmp_path)
    local = {n: local_tm.load([prepared[n].task])["tasks"][prepared[n].task] for n in REGISTRY_BENCHMARKS}

    real_load = datasets.load_dataset
    loading = {}

    def fake_load_dataset(path, name=None, **kwargs):
        return real_load("json", data_files=registry_files[loading["task"]], cache_dir=str(tmp_path / "c"))

    monkeypatch.setattr(lm_eval.api.task.datasets, "load_dataset", fake_load_dataset)
    registry_tm = TaskManager()
    for bench in REGISTRY_BENCHMARKS:
        task_name = ge.BENCHMARKS[bench].registry_task
        loading["task"] = task_name
        reg = registry_tm.load([task_name])["tasks"][task_name]
        loc = local[bench]
        shots = cfg.benchmarks[[b.name for b in cfg.benchmarks].index(bench)].shots
        doc_local, doc_reg = loc.eval_docs[0], reg.eval_docs[0]
        assert doc_local == doc_reg
        for k in (0, shots):
            for task in (loc, reg):
                task.set_config("num_fewshot", k)
                task.set_fewshot_seed(seed=1234)
            assert loc.fewshot_context(doc_local, k) == reg.fewshot_context(doc_reg, k)
        assert loc.doc_to_target(doc_local) == reg.doc_to_target(doc_reg)
        if loc.OUTPUT_TYPE == "multiple_choice":
            assert loc.doc_to_choice(doc_local) == reg.doc_to_choice(doc_reg)
        if bench == "commonsense_qa":  # the registry's own format, spelled out once
            prompt = loc.fewshot_context(doc_local, 0)
            assert prompt.startswith("Question: ") and prompt.endswith(
                "\nE. " + doc_local["choices"]["text"][4] + "\nAnswer:"
            )
        if bench == "hellaswag":  # lm-eval's process_docs ran (the "[title]" artefact is gone)
            assert "[title]" not in loc.fewshot_context(doc_local, 0)


# ---------------------------------------------------------------------------- Alpaca ROUGE-L
HAND_CHECKED = [
    # (reference, prediction, ROUGE-L F1 by hand: LCS over lower-cased word tokens)
    ("the cat is on the mat", "the cat sat on the mat", 5 / 6),  # LCS 5 of 6 and 6
    ("Paris is the capital of France.", "The capital is Paris", 0.4),  # LCS "the capital": P 2/4, R 2/6
    ("Blue.", "red", 0.0),
]


def test_rouge_l_metric_on_hand_checked_pairs():
    for reference, prediction, expected in HAND_CHECKED:
        assert gt.rouge_l([reference], [prediction]) == pytest.approx(expected)


def _canned_lm(answers: dict[str, str]):
    """A stand-in lm-eval LM: answers each Alpaca prompt with a canned prediction, records prompts."""
    from lm_eval.api.model import LM

    class CannedLM(LM):
        def __init__(self):
            super().__init__()
            self.prompts = []

        def generate_until(self, requests, disable_tqdm=False):
            out = []
            for req in requests:
                prompt = req.args[0]
                self.prompts.append(prompt)
                instruction = prompt.rsplit("### Instruction:\n", 1)[1].split("\n\n### Response:")[0]
                out.append(answers[instruction])
            return out

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return CannedLM()


def test_alpaca_scores_rouge_l_through_lm_eval(tmp_path):
    rows = [{"instruction": f"Task {i}: answer.", "output": ref} for i, (ref, _, _) in enumerate(HAND_CHECKED)]
    rows.append({"instruction": "Demo: say hi.", "output": "hi there"})
    path = gt.write_jsonl(tmp_path / "alpaca.jsonl", rows)
    answers = {r["instruction"]: pred for r, (_, pred, _) in zip(rows, HAND_CHECKED)} | {"Demo: say hi.": "hi there"}
    expected_by_instruction = {r["instruction"]: f for r, (_, _, f) in zip(rows, HAND_CHECKED)} | {"Demo: say hi.": 1.0}

    cfg = ge.parse_config(_cfg({"alpaca": {"file": str(path), "shots": 1}}, fewshot_pool=1))
    prepared = ge.prepare_benchmarks(cfg, data_root=None, work_dir=tmp_path / "w", seed=0)
    pool, test = gt.seeded_split(gt.alpaca_rows(path), 1, seed=0)
    lm = _canned_lm(answers)
    out = ge.run_benchmarks(lm, prepared, cfg, task_manager=ge.make_task_manager(prepared, tmp_path / "w"), seed=0)

    expected = 100 * sum(expected_by_instruction[r["instruction"]] for r in test) / len(test)
    assert out["zero_shot"]["alpaca"] == pytest.approx(expected)
    assert out["few_shot"]["alpaca"] == pytest.approx(expected)  # same documents, same canned answers
    assert out["details"]["alpaca"]["n"] == len(test) == 3
    # Zero-shot prompts are the Alpaca template; few-shot ones start with a demonstration from the pool.
    zero, few = lm.prompts[:3], lm.prompts[3:]
    assert all(p.startswith("Below is an instruction") and p.endswith("### Response:") for p in zero)
    demo = f"### Instruction:\n{pool[0]['instruction']}\n\n### Response: {pool[0]['output']}\n\nBelow is an instruction"
    assert all(demo in p for p in few)


# ---------------------------------------------------------------------------- with the tiny model
def _batch_sizes_seen(model):
    seen = []
    handle = model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[0]),
        with_kwargs=True,
    )
    return seen, handle


def test_batch_size_reaches_hflm_and_state_is_restored(own_tiny, tmp_path):
    model, tokenizer = own_tiny
    cfg = _cfg({"synthetic_odd_one_out": {"ip": False}}, limit=12)
    sizes = {}
    for batch_size in (1, 4):
        model.train()
        torch.manual_seed(123)
        expected_next = torch.rand(3)
        torch.manual_seed(123)
        random.seed(5)
        expected_py = random.random()
        random.seed(5)
        seen, handle = _batch_sizes_seen(model)
        try:
            out = ge.evaluate_general(
                model,
                tokenizer,
                {**cfg, "batch_size": batch_size},
                data_root=None,
                work_dir=str(tmp_path / f"b{batch_size}"),
                device="cpu",
                seed=0,
            )
        finally:
            handle.remove()
        sizes[batch_size] = set(seen)
        # Left as found: train mode everywhere, and the global generators where they were.
        assert model.training and all(m.training for m in model.modules())
        assert torch.equal(torch.rand(3), expected_next) and random.random() == expected_py
        assert out["details"]["synthetic_odd_one_out"]["n"] == 12
        assert 0.0 <= out["zero_shot"]["synthetic_odd_one_out"] <= 100.0
        assert out["few_shot"] == {} and out["seconds"] > 0
    assert sizes[1] == {1}
    assert max(sizes[4]) == 4
    model.eval()


def test_offline_synthetic_and_local_benchmarks(own_tiny, data_root, tmp_path, monkeypatch):
    model, tokenizer = own_tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_network(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    # max_length 160: these CommonsenseQA prompts fit zero-shot (66-152 tokens) but not 2-shot.
    cfg = _cfg(
        {"synthetic_count_items": {"shots": 2}, "commonsense_qa": {"source": "local", "shots": 2}},
        limit=8,
        batch_size=8,
        max_length=160,
    )
    out = ge.evaluate_general(
        model, tokenizer, cfg, data_root=str(data_root), work_dir=str(tmp_path), device="cpu", seed=0
    )
    for mode in ("zero_shot", "few_shot"):
        assert set(out[mode]) == {"synthetic_count_items", "commonsense_qa"}
        assert all(0.0 <= v <= 100.0 for v in out[mode].values())
    assert out["details"]["commonsense_qa"]["source"].startswith("local:")
    assert out["details"]["commonsense_qa"] == {
        **out["details"]["commonsense_qa"],
        "task": "clb_commonsense_qa",
        "metric": "acc,none",
        "n": 8,
        "shots": 2,
    }
    assert out["benchmarks"] == {
        "gp": ["synthetic_count_items", "commonsense_qa"],
        "ip": ["synthetic_count_items", "commonsense_qa"],
    }
    # 2-shot: every one of the 8 questions x 5 answer choices is a left-truncated loglikelihood request.
    assert out["truncated_contexts"] == {"zero_shot": 0, "few_shot": 40}
    assert out["details"]["commonsense_qa"]["truncated"] == {
        "zero_shot": {"loglikelihood": 0, "generate_until": 0},
        "few_shot": {"loglikelihood": 40, "generate_until": 0},
    }


def test_truncated_generation_prompts_are_counted_per_benchmark(own_tiny, tmp_path):
    """lm-eval cuts generation prompts longer than max_length - max_gen_toks from the left
    without a word in its results: every such request is counted and shown in the summary."""
    from cl_bench.run.summary import format_summary

    model, tokenizer = own_tiny
    # count_items questions are 13-17 tokens (fit in 40 - 8 new tokens); with 5 demonstrations they do not.
    cfg = _cfg({"synthetic_count_items": {"shots": 5}, "synthetic_odd_one_out": {"ip": False}}, limit=6, max_length=40)
    out = ge.evaluate_general(model, tokenizer, cfg, data_root=None, work_dir=str(tmp_path), device="cpu", seed=0)
    assert out["details"]["synthetic_count_items"]["truncated"] == {
        "zero_shot": {"loglikelihood": 0, "generate_until": 0},
        "few_shot": {"loglikelihood": 0, "generate_until": 6},
    }
    assert out["details"]["synthetic_odd_one_out"]["truncated"] == {
        "zero_shot": {"loglikelihood": 0, "generate_until": 0}
    }
    assert out["truncated_contexts"] == {"zero_shot": 0, "few_shot": 6}
    summary = format_summary({"sequence": "s", "tasks": ["a"], "matrix": [[1.0]], "general": {"0": out}})
    assert "truncated prompts: zero-shot 0, few-shot 6" in summary


def test_registry_benchmark_offline_is_a_data_error(own_tiny, tmp_path, monkeypatch):
    if os.environ.get("HF_DATASETS_OFFLINE") != "1":
        pytest.skip("needs HF_DATASETS_OFFLINE=1 (set by the Makefile and the test environment)")
    model, tokenizer = own_tiny
    cfg = _cfg({"hellaswag": {"source": "registry"}}, limit=4)
    with pytest.raises(DataError, match=r"general_eval\.benchmarks\.hellaswag: lm-eval task 'hellaswag'"):
        ge.evaluate_general(model, tokenizer, cfg, data_root=None, work_dir=str(tmp_path), device="cpu", seed=0)


@pytest.mark.slow
def test_paper_config_on_the_tiny_model(own_tiny, data_root, tmp_path):
    """general_eval=paper from local files: CommonsenseQA, HellaSwag, Alpaca 0/5-shot, BBH 3-shot."""
    model, tokenizer = own_tiny
    cfg = _conf("paper")
    cfg.update(limit=4, batch_size=8)
    cfg["benchmarks"]["bbh_object_counting"]["generation_kwargs"] = {"max_gen_toks": 16}
    cfg["benchmarks"]["alpaca"]["generation_kwargs"] = {"max_gen_toks": 16}
    out = ge.evaluate_general(
        model, tokenizer, cfg, data_root=str(data_root), work_dir=str(tmp_path), device="cpu", seed=0
    )
    assert set(out["zero_shot"]) == {"hellaswag", "commonsense_qa", "alpaca"}
    assert set(out["few_shot"]) == {"hellaswag", "commonsense_qa", "alpaca", "bbh_object_counting"}
    assert out["details"]["bbh_object_counting"]["task"] == "clb_bbh_object_counting"
    assert out["details"]["bbh_object_counting"]["shots"] == 3
    assert all(d["n"] == 4 for d in out["details"].values())
    assert out["details"]["bbh_object_counting"]["generation_kwargs"] == {"max_gen_toks": 16}
    agg = ge.aggregate_gp_ip({"0": out}, cfg)
    assert agg["GP"] == pytest.approx(sum(out["zero_shot"].values()) / 3)
    assert agg["IP"] == pytest.approx(sum(out["few_shot"].values()) / 4)


def test_peft_model_is_evaluated_in_memory(own_tiny, tmp_path):
    """A PEFT-wrapped model goes to lm-eval as is: with B = 0 it scores exactly like the base
    model; with a non-zero adapter the log-likelihoods lm-eval sees change."""
    import copy

    from peft import LoraConfig, get_peft_model

    model, tokenizer = own_tiny
    cfg = _cfg({"synthetic_odd_one_out": {"ip": False}}, limit=16, batch_size=8)

    def loglikelihoods(m, name):
        seen = []
        hook = m.register_forward_hook(lambda mod, args, out: seen.append(out.logits.sum().item()))
        try:
            score = ge.evaluate_general(
                m, tokenizer, cfg, data_root=None, work_dir=str(tmp_path / name), device="cpu", seed=0
            )["zero_shot"]["synthetic_odd_one_out"]
        finally:
            hook.remove()
        return score, seen

    base_score, base_logits = loglikelihoods(model, "base")
    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    zero_score, zero_logits = loglikelihoods(peft_model, "zero")
    assert zero_score == base_score and zero_logits == pytest.approx(base_logits, rel=1e-5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    _, moved_logits = loglikelihoods(peft_model, "moved")
    assert moved_logits != pytest.approx(base_logits, rel=1e-3)


def test_config_group_composes_with_hydra():
    from helpers import compose

    assert ge.parse_config(compose([]).general_eval).gp_benchmarks == ["synthetic_odd_one_out", "synthetic_count_items"]
    paper = ge.parse_config(
        compose(["general_eval=paper", "~general_eval.benchmarks.hellaswag", "general_eval.limit=50"]).general_eval
    )
    assert paper.gp_benchmarks == ["commonsense_qa", "alpaca"] and paper.limit == 50
    assert ge.parse_config(compose(["general_eval=none"]).general_eval).when == "none"


def test_demonstrations_never_repeat_a_scored_document(tmp_path):
    """A duplicated document split into both the few-shot pool and the scored rows would show its
    own answer as a demonstration: such pool rows are dropped and counted."""
    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(10) for _ in range(2)]
    path = gt.write_jsonl(tmp_path / "alpaca.jsonl", rows)
    cfg = ge.parse_config(_cfg({"alpaca": {"file": str(path), "shots": 1}}, fewshot_pool=6))
    (item,) = ge.prepare_benchmarks(cfg, data_root=None, work_dir=tmp_path / "w", seed=0)
    read = lambda split: [
        json.loads(x) for x in (tmp_path / "w" / "tasks" / f"clb_alpaca.{split}.jsonl").read_text().splitlines()
    ]  # noqa: E731
    pool, test = read("train"), read("test")
    assert not {r["instruction"] for r in pool} & {r["instruction"] for r in test}
    assert len(test) == 14 and len(pool) + item.pool_dropped_duplicates == 6 and item.pool_dropped_duplicates > 0

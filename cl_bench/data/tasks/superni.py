"""Super-NaturalInstructions (SuperNI) tasks.

Formats read (first match wins, every path tried is reported when none matches):
  * natural-instructions per-task JSON `<task>.json` (Definition, Positive Examples, Instances with
    `output` a list of references), optionally with a `<task>.test.json` next to it;
  * the processed layout of the CL repos (SAPT / GainLoRA `CL_Benchmark/SuperNI/<task>/{train,dev,
    test}.json`, same schema, `output` may be a plain string);
  * the HF Hub copy `Muennighoff/natural-instructions` (columns task_name, definition, inputs,
    targets) when no local file exists.

Prompt = Definition + "\\n\\n" + "Input: " + input (the chat template is applied later, in
cl_bench/data/prompts.py); target (trained on) = the first reference output; every reference output is kept
on the example and scoring takes the best one. Split: with a separate test file, eval = seed-shuffled
test examples and train = the training file; otherwise eval is held out of the one file by
`split_examples`. Training examples whose prompt also occurs in eval are dropped (duplicated
instances are common in SuperNI), so gradients and replay never see an evaluated prompt.

The metric kind comes from METRIC_TABLE (by what the task outputs), never from a coarse category,
and is scored by the natural-instructions rules (scoring.ni_exact_match / ni_rouge_l: max over
references, its normalize_answer, ROUGE-L with stemming). Under evaluation.protocol=slice_paper the
SLICE authors' metric applies instead: exact match for the tasks their registry calls
classification, ROUGE-L for the rest (SLICE_PAPER_KIND), with their normalization.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ...infra.errors import DataError
from .base import VALID_METRICS, Example, TaskData, data_roots, split_for_task

HF_DATASET = "Muennighoff/natural-instructions"
DOWNLOAD_HINT = (
    "download tasks/{task}.json from https://github.com/allenai/natural-instructions "
    "(or CL_Benchmark/SuperNI/{task}/ from the SAPT/GainLoRA repos) into <data.root>/superni/, "
    "then set data.root=<dir> or env CL_BENCH_DATA=<dir>"
)

EM, RL = "exact_match", "rouge_l"
# Metric kind -> the natural-instructions scorer of that kind (scoring.py).
NI_METRIC = {EM: "ni_exact_match", RL: "ni_rouge_l"}

# Task -> metric by output kind: EM where the answer is a label, number, letter, word or a
# fixed-format string with one right answer; ROUGE-L where it is free text or a span list that
# deserves partial credit. (*) = checked against real SuperNI task files (their outputs).
METRIC_TABLE: dict[str, str] = {
    # --- label / number / short answer -------------------------------------------------------
    "task002_quoref_answer_generation": EM,  # (*) short entity span from the passage
    "task073_commonsenseqa_answer_generation": EM,  # (*) option letter A-E
    "task079_conala_concat_strings": EM,  # the concatenated string
    "task085_unnatural_addsub_arithmetic": EM,  # (*) integer
    "task086_translated_symbol_arithmetic": EM,  # (*) integer
    "task087_new_operator_addsub_arithmetic": EM,  # integer
    "task088_identify_typo_verification": EM,  # (*) the misspelt word
    "task090_equation_learner_algebra": EM,  # (*) integer
    "task092_check_prime_classification": EM,  # Yes / the prime check answer
    "task119_semeval_2019_task10_geometric_mathematical_answer_generation": EM,  # option letter
    "task141_odd-man-out_classification_category": EM,  # (*) one word of the five
    "task161_count_words_containing_letter": EM,  # (*) count
    "task163_count_words_ending_with_letter": EM,  # (*) count
    "task183_rhyme_generation": EM,  # one word
    "task195_sentiment140_classification": EM,  # positive / negative
    "task199_mnli_classification": EM,  # yes / no
    "task205_remove_even_elements": EM,  # (*) a list like [41, 127]
    "task206_collatz_conjecture": EM,  # a list of integers
    "task208_combinations_of_list": EM,  # a list of lists
    "task209_stancedetection_classification": EM,  # in favor / against
    "task220_rocstories_title_classification": EM,  # option a / b
    "task224_scruples_anecdotes_ethical_judgment": EM,  # yes / no
    "task231_iirc_link_classification": EM,  # option letter
    "task243_count_elements_in_set_intersection": EM,  # (*) count
    "task273_europarl_classification": EM,  # yes / no
    "task286_olid_offense_judgment": EM,  # Offensive / Not offensive
    "task325_jigsaw_classification_identity_attack": EM,  # Yes / No
    "task327_jigsaw_classification_toxic": EM,  # Yes / No
    "task339_record_answer_generation": EM,  # (*) cloze entity
    "task363_sst2_polarity_classification": EM,  # (*) POS / NEG
    "task488_extract_all_alphabetical_elements_from_list_in_order": EM,  # the letters, in order
    "task513_argument_stance_classification": EM,  # in favor / against / neutral
    "task517_emo_classify_emotion_of_dialogue": EM,  # emotion label
    "task591_sciq_answer_generation": EM,  # (*) short answer (one or two words)
    "task611_mutual_multi_turn_dialogue": EM,  # multiple choice (the correct option)
    "task828_copa_commonsense_cause_effect": EM,  # cause / effect
    "task875_emotion_classification": EM,  # (*) emotion label
    "task1152_bard_analogical_reasoning_causation": EM,  # one word
    "task1292_yelp_review_full_text_categorization": EM,  # rating 1-5
    "task1310_amazonreview_rating_classification": EM,  # rating 1-5
    "task1332_check_leap_year": EM,  # (*) 0 / 1
    "task1343_amazon_us_reviews_rating": EM,  # rating 1-5
    "task1346_glue_cola_grammatical_correctness_classification": EM,  # 0 / 1
    "task1429_evalution_semantic_relation_classification": EM,  # (*) relation label
    "task1510_evalution_relation_extraction": EM,  # (*) "word1 Relation word2"
    "task1582_bless_hypernym_generation": EM,  # one word
    "task1687_sentiment140_classification": EM,  # (*) positive / negative
    # --- free text / span lists --------------------------------------------------------------
    "task024_cosmosqa_answer_generation": RL,  # free-text answer
    "task077_splash_explanation_to_sql": RL,  # SQL query; many equivalent spellings
    "task179_participant_extraction": RL,  # list of spans
    "task180_intervention_extraction": RL,  # (*) list of spans
    "task181_outcome_extraction": RL,  # (*) list of spans
    "task271_europarl_translation": RL,  # translation
    "task292_storycommonsense_character_text_generation": RL,  # character list / phrase
    "task360_spolin_yesand_response_generation": RL,  # (*) dialogue response
    "task376_reverse_order_of_words": RL,  # (*) a whole sentence
    "task425_hindienglish_corpora_en_hi_translation": RL,  # translation
    "task511_reddit_tifu_long_text_summarization": RL,  # (*) summary
    "task589_amazonfood_summary_text_generation": RL,  # (*) summary
    "task618_amazonreview_summary_text_generation": RL,  # (*) summary
    "task619_ohsumed_abstract_title_generation": RL,  # title
    "task639_multi_woz_user_utterance_generation": RL,  # (*) utterance
    "task748_glucose_reverse_cause_event_detection": RL,  # (*) "A >Causes/Enables> B" sentence
    "task1290_xsum_summarization": RL,  # (*) summary
    "task1355_sent_comp_summarization": RL,  # (*) summary
    "task1357_xlsum_summary_generation": RL,  # summary
    "task1572_samsum_summary": RL,  # (*) summary
    "task1590_diplomacy_text_generation": RL,  # (*) dialogue message
    "task1711_poki_text_generation": RL,  # poem
    "task1729_personachat_generate_next": RL,  # (*) dialogue response
}

# The SLICE authors' category per task (their cl_lora/task_sequences.py registry, RamiroNB/slice):
# classification -> exact match, generation -> ROUGE-L. Their NI360 (a response generation
# task) is registered as classification, and NI141/NI163/NI002 as generation: kept as they scored them.
_PAPER_EM = "195 1343 1310 1292 363 231 220 224 273 360 1510 088 092 119 199 209 286 325 327 513 517 828 1332 1346 1429"
_PAPER_RL = (
    "618 1290 589 511 1357 1355 141 619 163 002 339 611 292 488 024 077 079 085 086 087 090 161 179 180 "
    "181 183 205 206 208 243 271 376 425 1152 1582 1711"
)
SLICE_PAPER_KIND: dict[int, str] = {
    **{int(n): EM for n in _PAPER_EM.split()},
    **{int(n): RL for n in _PAPER_RL.split()},
}
_SLICE_METRIC = {EM: "slice_exact_match", RL: "slice_rouge_l"}

_SHORT_ID = re.compile(r"(?:ni|task)?0*(\d+)")


def resolve_task_name(name: str) -> str:
    """Full task name for a full name or a short id ("task088", "NI088", "088", "88")."""
    if name in METRIC_TABLE:
        return name
    match = _SHORT_ID.fullmatch(name.strip().lower())
    if match:
        number = int(match.group(1))
        for full in METRIC_TABLE:
            if int(full[4:].split("_", 1)[0]) == number:
                return full
    return name


def metric_kind(task: str, override: str | None = None) -> str:
    """The metric kind of a task: the sequence YAML's override, else METRIC_TABLE."""
    if override is not None:
        if override not in VALID_METRICS:
            raise DataError(
                f"metric override {override!r} for SuperNI task {task!r} is invalid; valid: {', '.join(VALID_METRICS)}"
            )
        return override
    try:
        return METRIC_TABLE[task]
    except KeyError:
        raise DataError(
            f"SuperNI task {task!r} has no metric in cl_bench/data/tasks/superni.py METRIC_TABLE; add it there "
            f"(exact_match for labels/short answers, rouge_l for free text) or set "
            f"`metrics: {{{task}: exact_match|rouge_l}}` in the sequence YAML"
        ) from None


def metric_for(task: str, override: str | None = None) -> str:
    """The scorer of a task under evaluation.protocol=per_task: its kind by the
    natural-instructions rules (exact_match -> ni_exact_match, rouge_l -> ni_rouge_l)."""
    kind = metric_kind(task, override)
    return NI_METRIC.get(kind, kind)


def paper_metric_for(task: str, kind: str) -> str:
    """The SLICE authors' scorer of a task: by their registry's category, else by its kind."""
    match = re.match(r"task0*(\d+)_", task)
    number = int(match.group(1)) if match else None
    paper_kind = SLICE_PAPER_KIND.get(number, kind)
    return _SLICE_METRIC.get(paper_kind, "slice_exact_match" if kind in (EM, "accuracy") else "slice_rouge_l")


# ------------------------------------------------------------------------------- files


def candidate_files(task: str, base: Path) -> list[tuple[Path, Path | None]]:
    """(training file, test file or None) pairs to try below one root, in order."""
    pairs: list[tuple[Path, Path | None]] = []
    for folder in (base / "superni", base, base / "tasks", base / "natural-instructions" / "tasks"):
        pairs.append((folder / f"{task}.json", folder / f"{task}.test.json"))
    for folder in (base / "superni", base / "CL_Benchmark" / "SuperNI", base / "SuperNI", base):
        pairs.append((folder / task / "train.json", folder / task / "test.json"))
    return pairs


def _definition(raw: dict, path: Path) -> str:
    definition = raw.get("Definition")
    if isinstance(definition, list):
        definition = definition[0] if definition else None
    if not isinstance(definition, str) or not definition.strip():
        raise DataError(f"{path}: key 'Definition' is missing or empty; expected the natural-instructions task schema")
    return definition.strip()


def build_prompt(definition: str, task_input: str) -> str:
    return f"{definition}\n\nInput: {task_input}"


def input_span(prompt: str, task_input: str) -> tuple[int, int]:
    """Where build_prompt put the input: the only part a too-long prompt may lose (Example.input_span)."""
    return len(prompt) - len(str(task_input)), len(prompt)


def _outputs(output, path: Path, index: int) -> tuple[str, ...]:
    """Every reference output of an instance (a list, or one string in the CL repos' copies)."""
    outputs = output if isinstance(output, list) else ([] if output is None else [output])
    for out in outputs:
        if not isinstance(out, str):
            raise DataError(
                f"{path}: Instances[{index}].output must be a string or a list of strings, got {type(out).__name__}"
            )
    return tuple(outputs)


def read_task_file(path: Path) -> tuple[str, list[Example]]:
    """(definition, examples) of one natural-instructions-schema file; instances without any
    reference output are skipped."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read SuperNI task JSON ({err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("Instances"), list):
        raise DataError(f"{path}: expected a JSON object with an 'Instances' list (natural-instructions task schema)")
    definition = _definition(raw, path)
    examples = []
    for i, inst in enumerate(raw["Instances"]):
        if not isinstance(inst, dict) or "input" not in inst:
            raise DataError(f"{path}: Instances[{i}] has no 'input'")
        outputs = _outputs(inst.get("output"), path, i)
        if not outputs:
            continue
        examples.append(
            Example(
                id=str(inst.get("id", f"{path.stem}-{i}")),
                prompt=(prompt := build_prompt(definition, inst["input"])),
                target=outputs[0],
                references=outputs,
                input_span=input_span(prompt, inst["input"]),
            )
        )
    if not examples:
        raise DataError(f"{path}: 'Instances' holds no instance with a reference output; a task needs at least 2")
    return definition, examples


def _from_hub(task: str) -> list[Example]:
    """All instances of `task` in the HF Hub copy (its train and test splits together)."""
    import datasets

    splits = datasets.load_dataset(HF_DATASET)
    examples: list[Example] = []
    for split in splits.values():
        for row in split.filter(lambda r: r["task_name"] == task):
            examples.append(
                Example(
                    id=str(row["id"]),
                    prompt=(prompt := build_prompt(row["definition"].strip(), row["inputs"])),
                    target=row["targets"],
                    input_span=input_span(prompt, row["inputs"]),
                )
            )
    if not examples:
        raise LookupError(f"no rows with task_name={task!r}")
    return examples


def load_task(
    name: str, *, root: str | None, n_train: int | None, n_eval: int, seed: int, metric: str | None = None
) -> TaskData:
    task = resolve_task_name(str(name))
    kind = metric_kind(task, metric)  # fail on a missing table entry before any I/O
    chosen_metric, paper_metric = metric_for(task, metric), paper_metric_for(task, kind)
    tried: list[str] = []
    for base in data_roots(root):
        for train_path, test_path in candidate_files(task, base):
            tried.append(str(train_path))
            if not train_path.is_file():
                continue
            _, train_pool = read_task_file(train_path)
            test_pool = read_task_file(test_path)[1] if test_path is not None and test_path.is_file() else None
            train, evaluated, info = split_for_task(train_pool, test_pool, n_train, n_eval, seed)
            origin = str(train_path) + (f" + {test_path}" if test_pool else "")
            return TaskData(
                task,
                chosen_metric,
                train,
                evaluated,
                origin=origin,
                info={"family": "superni", **info},
                paper_metric=paper_metric,
            )
    try:
        pool = _from_hub(task)
    except Exception as err:  # offline, not installed, unknown task: all end in the one message below
        where = "; ".join(tried) if tried else "no local path (data.root and CL_BENCH_DATA are unset)"
        raise DataError(
            f"SuperNI task {task!r} not found. Tried: {where}; HF Hub {HF_DATASET}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}. To get it: " + DOWNLOAD_HINT.format(task=task)
        ) from None
    train, evaluated, info = split_for_task(pool, None, n_train, n_eval, seed)
    return TaskData(
        task,
        chosen_metric,
        train,
        evaluated,
        origin=f"hf:{HF_DATASET}",
        info={"family": "superni", **info},
        paper_metric=paper_metric,
    )

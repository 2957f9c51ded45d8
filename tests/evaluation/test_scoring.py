"""Per-example metrics against hand-computed values (TRACE's official metrics included)."""

from __future__ import annotations

import random

import pytest

from cl_bench.data.answers import chosen_label
from cl_bench.evaluation import scoring
from cl_bench.evaluation.scoring import (
    METRICS,
    accuracy,
    edit_similarity,
    exact_match,
    indel_similarity,
    lcs_length,
    resolve_code_literals,
    rouge_l,
    sari,
    sari_multi,
    score,
)


def test_exact_match_normalizes_case_space_and_trailing_punctuation():
    assert exact_match("  Karge. ", "karge") == 1.0
    assert exact_match("karge", "large") == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "b"),
        ("B. Because the sun is hot", "b"),
        ("Answer: C\nBecause ...", "c"),
        ("the answer: a", "a"),
        ("Because of the rain", None),  # "because" starts with b but is not the option B
        ("", None),
    ],
)
def test_chosen_label_needs_a_whole_word_option(text, expected):
    assert chosen_label(text, ["A", "B", "C"]) == expected


def test_accuracy_maps_predictions_to_the_label_set():
    labels = ["positive", "negative"]
    assert accuracy("Positive, because it is nice", "positive", labels) == 1.0
    assert accuracy("negative.", "positive", labels) == 0.0
    assert accuracy("I cannot say", "positive", labels) == 0.0
    # TRACE ScienceQA: the option after "Answer:" decides, reasons do not.
    assert (
        accuracy("Answer: B Because plants need light.", "Answer: B Because of photosynthesis.", list("ABCDE")) == 1.0
    )
    assert accuracy("Answer: A", "Answer: B", list("ABCDE")) == 0.0
    # Numeric tasks have no label set: exact match after normalization.
    assert accuracy("42", "42", None) == 1.0 and accuracy("42.5", "42", None) == 0.0


def test_rouge_l_hand_computed():
    # LCS("the cat", "the cat sat") = 2: P = 2/2, R = 2/3, F = 2PR/(P+R) = 0.8.
    assert rouge_l("the cat", "the cat sat") == pytest.approx(0.8)
    assert rouge_l("", "") == 1.0
    # Chinese: character LCS. "我很好" vs "我好": LCS 2, P = 2/3, R = 1, F = 0.8.
    assert rouge_l("我很好", "我好") == pytest.approx(0.8)


def test_lcs_length_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abcé中 ") for _ in range(rng.randint(0, 40)))
        b = "".join(rng.choice("abcdé中") for _ in range(rng.randint(0, 40)))
        assert lcs_length(a, b) == scoring._lcs_len(a, b), (a, b)


def test_edit_similarity_hand_computed():
    # LCS("abcd", "abed") = 3 ("abd"): 2*3 / (4+4) = 0.75.
    assert edit_similarity("abcd", "abed") == pytest.approx(0.75)
    # LCS("kitten", "sitting") = 4 ("ittn"): 8/13.
    assert indel_similarity("kitten", "sitting") == pytest.approx(8 / 13)
    assert edit_similarity("x = 1", "x = 1") == 1.0
    assert edit_similarity("", "return x") == 0.0
    assert edit_similarity("", "") == 1.0


def test_edit_similarity_resolves_py150_literals():
    assert resolve_code_literals("f(<NUM_LIT>, <STR_LIT>, <STR_LIT:hello>, <CHAR_LIT:c>)") == "f(0, , hello, c)"
    assert edit_similarity("x = <NUM_LIT>", "x = 0") == 1.0
    assert edit_similarity("name = '<STR_LIT:bob>'", "name = 'bob'") == 1.0


def test_sari_hand_computed_single_reference():
    # source "a b c", prediction "a c d", reference "a d".
    # n=1: keep {a,c}, good {a}: P=1/2, R=1/1 -> F=2/3; delete {b} good {b}: P=1; add {d} good {d}: F=1.
    # n=2: keep {} -> P=R=1, F=1; delete {ab,bc} both good: P=1; add {ac,cd} none in ref {ad}: F=0.
    # n=3: keep F=1; delete {abc} good: P=1; add {acd}, reference has no trigram: P=0, R=1 -> F=0.
    # n=4: nothing anywhere: 1, 1, 1.
    # SARI = ((2/3+1+1+1) + 4 + (1+0+0+1)) / 12 = 29/36.
    assert sari_multi("a b c", "a c d", ["a d"]) == pytest.approx(29 / 36)
    assert sari("a c d", "a d", source="a b c") == pytest.approx(29 / 36)


def test_sari_counts_deletions_beyond_what_the_reference_keeps():
    # source "a a b", prediction "b", reference "a b".
    # n=1: keep {b} good: P=1; references keep {a:1, b:1}, kept good 1 -> R=1/2, F=2/3;
    #      deleted {a:2}, reference still has one a -> good 1 of 2: P=1/2; no additions: F=1.
    # n=2: keep {} P=1, references keep {ab}: R=0 -> F=0; deleted {aa, ab}, good {aa}: P=1/2; add F=1.
    # n=3: keep F=1; deleted {aab} good: P=1; add F=1.   n=4: 1, 1, 1.
    # SARI = ((2/3+0+1+1) + (1/2+1/2+1+1) + 4) / 12 = 29/36.
    assert sari_multi("a a b", "b", ["a b"]) == pytest.approx(29 / 36)


def test_sari_published_example_with_three_references():
    # The worked example of the SARI metric card used by TRACE (datasets/evaluate "sari"): 26.9536.
    value = sari_multi(
        "About 95 species are currently accepted.",
        "About 95 you now get in.",
        ["About 95 species are currently known.", "About 95 species are now accepted.", "95 species are now accepted."],
    )
    assert value * 100 == pytest.approx(26.953601953601954, abs=1e-9)


def test_sari_copying_a_correct_simplification_scores_one():
    assert sari_multi("the cat sat", "the cat sat", ["the cat sat"]) == pytest.approx(1.0)
    assert sari_multi("Der Hund bellt laut.", "der hund bellt laut .", ["Der Hund bellt laut."]) == pytest.approx(1.0)


def test_sari_needs_the_source():
    with pytest.raises(ValueError, match="source"):
        score("sari", "a", "b")


def test_score_passes_source_and_every_metric_accepts_it():
    for metric in METRICS:
        value = score(metric, "a d", "a d", ["a d"], source="a b c")
        assert 0.0 <= value <= 1.0
    assert score("exact_match", "x", "x", None, source=None) == 1.0
    assert score("sari", "a c d", "a d", None, source="a b c") == pytest.approx(29 / 36)


def test_score_rejects_unknown_metric_and_keywords():
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", "a", "a")
    with pytest.raises(TypeError, match="unexpected"):
        score("exact_match", "a", "a", refs=["a"])


# ------------------------------------------------------------------ natural-instructions rules


def test_normalize_answer_is_the_natural_instructions_rule():
    # lowercase, every string.punctuation character removed, whitespace collapsed; articles kept.
    assert scoring.normalize_answer("  The (Cat),  is HERE! ") == "the cat is here"
    assert exact_match("The cat", "cat") == 0.0 and score("ni_exact_match", "The cat", "cat") == 0.0
    assert score("ni_exact_match", "Mary-Sachs.", "mary sachs") == 0.0  # "-" is removed, not spaced
    assert score("ni_exact_match", "Mary Sachs.", "mary sachs") == 1.0


def test_every_metric_that_admits_it_takes_the_best_reference():
    refs = ["Karluk.", "Alaska.", "Mary Sachs."]  # task002 test instance with three valid answers
    for metric in ("ni_exact_match", "exact_match", "ni_rouge_l", "rouge_l"):
        assert score(metric, "Mary Sachs", refs) == 1.0, metric
        assert score(metric, "Mary Sachs", refs[0]) == 0.0, metric  # first reference only: wrong
    assert score("edit_similarity", "Mary Sachs.", refs) == 1.0
    assert score("accuracy", "b", ["A", "B"], ["A", "B"]) == 1.0
    # ROUGE-L: the best of the per-reference F1s. "the cat" vs "the cat sat" = 0.8 (P 1, R 2/3).
    assert score("rouge_l", "the cat", ["a dog", "the cat sat"]) == pytest.approx(0.8)


def test_ni_rouge_l_stems_like_the_official_scorer():
    # Porter stems of tokens longer than 3: [the, cat, are, run] vs [the, cat, run] -> LCS 3,
    # P = 3/4, R = 1, F = 6/7. Unstemmed: [the, cats, are, running] vs [the, cat, runs] -> LCS 1, F = 2/7.
    assert score("ni_rouge_l", "The cats are running", "the cat runs") == pytest.approx(6 / 7)
    assert score("rouge_l", "The cats are running", "the cat runs") == pytest.approx(2 / 7)


def test_slice_paper_metrics_are_the_authors_rules():
    # lowercase/strip/whitespace only: a trailing period is a mismatch, whitespace tokens for ROUGE-L.
    assert score("slice_exact_match", " Positive ", "positive") == 1.0
    assert score("slice_exact_match", "positive.", "positive") == 0.0
    assert score("slice_rouge_l", "the cat", "The cat sat") == pytest.approx(0.8)
    assert score("slice_rouge_l", "我很好", "我好") == 0.0  # one whitespace token each
    assert score("slice_rouge_l", "", "") == 0.0
    # only the first reference counts, as in their data loader
    assert score("slice_exact_match", "Alaska", ["Karluk.", "Alaska"]) == 0.0


# ------------------------------------------------------------------ exact match keeps brackets (item 10b)


def test_exact_match_keeps_closing_brackets_and_drops_sentence_punctuation():
    assert exact_match("(a", "(a)") == 0.0
    assert exact_match("[41, 127", "[41, 127]") == 0.0
    assert exact_match("(a).", "(a)") == 1.0 and exact_match("positive!", "Positive") == 1.0
    assert chosen_label("(B)", ["A", "B"]) is None  # "(b)" does not start with the option b
    # The natural-instructions rule removes every punctuation mark, so there they are equal by design.
    assert score("ni_exact_match", "(a", "(a)") == 1.0


# ------------------------------------------------------------------ ROUGE-L by script (item 3)


@pytest.mark.parametrize(
    "prediction, target, expected",
    [
        # Hindi target, one English word in the prediction: LCS 5 of 6 and 6 tokens -> 5/6.
        ("भारत की capital नई दिल्ली है", "भारत की राजधानी नई दिल्ली है", 5 / 6),
        # Two Hindi sentences sharing only "2023": LCS 1 of 5 and 5 -> 0.2.
        ("वह 2023 से खुश था", "मैं 2023 में दिल्ली गया", 0.2),
        # Cyrillic, case-insensitive, dash is not a token: 3 of 3.
        ("Москва столица россии", "Москва — столица России", 1.0),
        ("Париж столица Франции", "Москва столица России", 1 / 3),
        # Greek / Arabic words: [καλημέρα, σας, φίλε] vs [καλημέρα, φίλε] -> P 2/3, R 1 -> 0.8;
        # [مرحبا, بالعالم] vs [مرحبا] -> P 1/2, R 1 -> 2/3.
        ("Καλημέρα σας φίλε", "καλημέρα φίλε", 0.8),
        ("مرحبا بالعالم", "مرحبا", 2 / 3),
        # Chinese and Japanese one token per character: 我很好/我好 LCS 2 -> P 2/3, R 1 -> 0.8;
        # 東京へ行く/東京に行く LCS 4 of 5 and 5 -> 0.8.
        ("我很好", "我好", 0.8),
        ("東京へ行く", "東京に行く", 0.8),
        # Mixed scripts: [我, 爱, python, 编, 程] vs [我, 爱, python] -> P 3/5, R 1 -> 0.75.
        ("我爱 Python 编程", "我爱 python", 0.75),
        # [я, люблю, python, и, go] vs [я, люблю, python] -> 0.75.
        ("я люблю Python и Go", "Я люблю python", 0.75),
        # ASCII text keeps rouge-score's own tokenizer: LCS("the cat", "the cat sat") -> 0.8.
        ("the cat", "the cat sat", 0.8),
    ],
)
def test_rouge_l_tokenizes_every_script(prediction, target, expected):
    assert rouge_l(prediction, target) == pytest.approx(expected)


def test_script_tokens_keep_combining_marks_and_split_scripts():
    # Devanagari vowel signs and virama (categories Mn/Mc) stay inside their word.
    assert scoring.script_tokens("हिन्दी भाषा") == ["हिन्दी", "भाषा"]
    assert scoring.script_tokens("Привет, мир2023!") == ["привет", "мир", "2023"]
    assert scoring.script_tokens("ＡＢＣ 123abc") == ["abc", "123abc"]  # NFKC, Latin+digits join like rouge-score
    # Stemming (ni_rouge_l) applies to the Latin words of mixed text: running/runs -> run.
    assert score("ni_rouge_l", "Я люблю running", "я люблю runs") == 1.0

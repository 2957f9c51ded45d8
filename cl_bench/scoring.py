"""Per-example scores in [0, 1]. Pure string functions; no model code.

Every metric has the signature `fn(prediction, target, labels=None, *, source=None)`; only SARI
uses `source`. Which metric a task uses is the task family's decision (a per-task table), never
guessed here.

- exact_match: normalized string equality.
- accuracy: the option a prediction picks from the task's label set (TRACE multiple choice and
  numeric tasks; an "Answer:" marker is honoured, as TRACE's ScienceQA scorer does).
- rouge_l: ROUGE-L F1 from `rouge_score` (the field's implementation). It tokenizes on ASCII
  letters and digits only, so for text without such characters (e.g. Chinese) we fall back to
  a character-level LCS F1.
- edit_similarity: TRACE's Py150 metric. TRACE calls fuzzywuzzy's `fuzz.ratio`; we compute the
  same quantity exactly as the normalized InDel similarity 2·LCS(a, b)/(|a|+|b|) on characters
  (what python-Levenshtein/rapidfuzz `ratio` return, unrounded, in [0, 1]) rather than difflib's
  matching-block heuristic. CodeXGLUE literal placeholders are resolved first, as TRACE does.
- sari: SARI (Xu et al., 2016) with the conventions of the authors' released scorer that TRACE
  uses through `datasets.load_metric("sari")`: n-grams of order 1..4 over lowercased
  sacrebleu-13a tokens; per order an F1 for kept and for added n-grams and a precision for
  deleted ones; SARI = (mean F_keep + mean P_del + mean F_add) / 3; an empty operation set
  scores 1 (0/0 := 1). sacrebleu 2.6 ships no SARI, hence this implementation.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import Callable, Sequence

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lowercase, strip, collapse whitespace, drop trailing punctuation."""
    text = _WS.sub(" ", text.strip().lower())
    return text.rstrip(string.punctuation + " ").strip()


def exact_match(prediction: str, target: str, labels: Sequence[str] | None = None, *, source: str | None = None) -> float:
    return float(normalize(prediction) == normalize(target))


# "Answer: B" / "answer:B" — the part after the marker is the choice (TRACE ScienceQA format).
_ANSWER_MARKER = re.compile(r"\banswer\s*:\s*", re.IGNORECASE)


def chosen_label(text: str, labels: Sequence[str]) -> str | None:
    """The label `text` answers with: after an "Answer:" marker if there is one, the longest
    label the answer starts with as a whole word ("B. because" -> B, "Because" -> none)."""
    marker = _ANSWER_MARKER.search(text)
    answer = normalize(text[marker.end():] if marker else text)
    for label in sorted(labels, key=len, reverse=True):
        norm = normalize(label)
        if not norm:
            continue
        if answer == norm or (answer.startswith(norm) and not answer[len(norm)].isalnum()):
            return norm
    return None


def accuracy(prediction: str, target: str, labels: Sequence[str] | None = None, *, source: str | None = None) -> float:
    """Classification accuracy over a label set: "positive." or "Positive, because..." count
    as "positive"; without a label set this is exact match."""
    if not labels:
        return exact_match(prediction, target)
    gold = chosen_label(target, labels)
    return float(gold is not None and chosen_label(prediction, labels) == gold)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def _lcs_len(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def lcs_f1(pred_tokens: Sequence[str], ref_tokens: Sequence[str]) -> float:
    if not pred_tokens or not ref_tokens:
        return 0.0
    lcs = _lcs_len(pred_tokens, ref_tokens)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred_tokens), lcs / len(ref_tokens)
    return 2 * p * r / (p + r)


_ASCII_WORD = re.compile(r"[a-z0-9]", re.IGNORECASE)


def rouge_l(prediction: str, target: str, labels: Sequence[str] | None = None, *, source: str | None = None) -> float:
    """ROUGE-L F1. Both empty counts as a match."""
    if not prediction.strip() and not target.strip():
        return 1.0
    if _ASCII_WORD.search(target) or _ASCII_WORD.search(prediction):
        return float(_rouge_scorer().score(target, prediction)["rougeL"].fmeasure)
    # No ASCII word characters (e.g. Chinese): character-level LCS.
    return lcs_f1(list(prediction.replace(" ", "")), list(target.replace(" ", "")))


# ---------------------------------------------------------------- edit similarity (TRACE Py150)

_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def resolve_code_literals(code: str) -> str:
    """CodeXGLUE/Py150 literal placeholders -> plain code, as TRACE's Py150 scorer does:
    bare <NUM_LIT> -> 0, bare <STR_LIT>/<CHAR_LIT> -> "", <X_LIT:value> -> value."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return _LITERAL.sub(lambda m: m.group(2), code)


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of two strings, bit-parallel (Hyyrö 2004):
    one big-int update per character of `b`, so long code lines stay fast in pure Python."""
    if not a or not b:
        return 0
    positions: dict[str, int] = {}
    for i, ch in enumerate(a):
        positions[ch] = positions.get(ch, 0) | (1 << i)
    all_ones = (1 << len(a)) - 1
    v = all_ones
    for ch in b:
        u = v & positions.get(ch, 0)
        v = ((v + u) | (v - u)) & all_ones
    # Each zero bit of v marks one LCS match.
    return len(a) - bin(v).count("1")


def indel_similarity(a: str, b: str) -> float:
    """1 - InDel distance / (|a|+|b|) = 2·LCS/(|a|+|b|); identical (even empty) strings -> 1."""
    if not a and not b:
        return 1.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


def edit_similarity(prediction: str, target: str, labels: Sequence[str] | None = None, *, source: str | None = None) -> float:
    return indel_similarity(resolve_code_literals(prediction.strip()), resolve_code_literals(target.strip()))


# ------------------------------------------------------------------------------- SARI

SARI_MAX_ORDER = 4


@lru_cache(maxsize=1)
def _sari_tokenizer():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def sari_tokens(text: str) -> list[str]:
    return _sari_tokenizer()(text.lower().strip()).split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def sari_ngram_scores(
    source: Counter, prediction: Counter, references: Sequence[Counter]
) -> tuple[float, float, float]:
    """(F1 keep, precision delete, F1 add) for one n-gram order.

    Counts of source and prediction are scaled by the number of references so that a kept or
    deleted n-gram is judged against the references' summed counts; additions are judged as
    sets. An empty operation set scores 1 (a prediction that changes nothing it should not).
    """
    k = len(references)
    ref = sum(references, Counter())
    src = Counter({g: c * k for g, c in source.items()})
    out = Counter({g: c * k for g, c in prediction.items()})

    kept = src & out  # n-grams of the source the prediction keeps
    kept_good = kept & ref
    keep_wanted = src & ref  # what the references keep
    p_keep = sum(kept_good[g] / kept[g] for g in kept) / len(kept) if kept else 1.0
    r_keep = sum(kept_good.values()) / sum(keep_wanted.values()) if keep_wanted else 1.0

    deleted = src - out
    deleted_good = deleted - ref  # deleted beyond what the references still contain
    p_del = sum(deleted_good[g] / deleted[g] for g in deleted) / len(deleted) if deleted else 1.0

    added = set(prediction) - set(source)
    add_wanted = set(ref) - set(source)
    added_good = added & add_wanted
    p_add = len(added_good) / len(added) if added else 1.0
    r_add = len(added_good) / len(add_wanted) if add_wanted else 1.0

    return _f1(p_keep, r_keep), p_del, _f1(p_add, r_add)


def sari_multi(source: str, prediction: str, references: Sequence[str]) -> float:
    """SARI in [0, 1] of one prediction against one or more references."""
    if not references:
        raise ValueError("SARI needs at least one reference")
    src_t, pred_t = sari_tokens(source), sari_tokens(prediction)
    refs_t = [sari_tokens(r) for r in references]
    keep = delete = add = 0.0
    for n in range(1, SARI_MAX_ORDER + 1):
        f_keep, p_del, f_add = sari_ngram_scores(
            _ngrams(src_t, n), _ngrams(pred_t, n), [_ngrams(r, n) for r in refs_t]
        )
        keep, delete, add = keep + f_keep, delete + p_del, add + f_add
    return (keep + delete + add) / (3 * SARI_MAX_ORDER)


def sari(prediction: str, target: str, labels: Sequence[str] | None = None, *, source: str | None = None) -> float:
    if source is None:
        raise ValueError("metric 'sari' needs the source sentence: the task's examples must set Example.source")
    return sari_multi(source, prediction, [target])


Metric = Callable[..., float]

METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "accuracy": accuracy,
    "rouge_l": rouge_l,
    "edit_similarity": edit_similarity,
    "sari": sari,
}


def score(
    metric: str,
    prediction: str,
    target: str,
    labels: Sequence[str] | None = None,
    *,
    source: str | None = None,
    **extra,
) -> float:
    """Score one prediction. `source` is used by SARI and ignored by the other metrics."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(sorted(METRICS))}") from None
    if extra:
        raise TypeError(f"score(): unexpected keyword(s) {', '.join(sorted(extra))}; metrics take only labels and source")
    return fn(prediction, target, labels, source=source)

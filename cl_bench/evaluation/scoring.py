"""Per-example scores in [0, 1]. Pure string functions; no model code.

Every metric has the signature `fn(prediction, target, labels=None, *, source=None)` and scores one
reference; `score()` takes the maximum over all references of an example for the metrics that admit
it (MAX_OVER_REFERENCES), as the natural-instructions evaluation does (`metric_max_over_ground_truths`
in allenai/natural-instructions eval/automatic/evaluation.py, the `compute_metrics.py` of Tk-Instruct).
SARI scores all references at once; the SLICE authors' metrics score the first reference only, as
they did. Which metric a task uses is the task family's decision (a per-task table), never guessed here.

cl_bench's own rules (synthetic tasks, TRACE):
- exact_match: `normalize` equality (lowercase, collapsed whitespace, trailing sentence punctuation
  . , ; : ! ? dropped; brackets and quotes are kept, so "(a" differs from "(a)").
- accuracy: the option a prediction picks from the task's label set (TRACE multiple choice and
  numeric tasks; an "Answer:" marker is honoured, as TRACE's ScienceQA scorer does).
- rouge_l: ROUGE-L F1 from `rouge_score` (the field's implementation, no stemming) on ASCII text;
  text with other letters is tokenized by script (`script_tokens`), because rouge-score's tokenizer
  keeps only [a-z0-9] and would score Hindi, Russian or Chinese text by its digits alone.
- edit_similarity: TRACE's Py150 metric. TRACE calls fuzzywuzzy's `fuzz.ratio`; we compute the
  same quantity exactly as the normalized InDel similarity 2·LCS(a, b)/(|a|+|b|) on characters
  (what python-Levenshtein/rapidfuzz `ratio` return, unrounded, in [0, 1]) rather than difflib's
  matching-block heuristic. CodeXGLUE literal placeholders are resolved first, as TRACE does.
- sari: SARI (Xu et al., 2016) with the conventions of the authors' released scorer that TRACE
  uses through `datasets.load_metric("sari")`: n-grams of order 1..4 over lowercased
  sacrebleu-13a tokens; per order an F1 for kept and for added n-grams and a precision for
  deleted ones; SARI = (mean F_keep + mean P_del + mean F_add) / 3; an empty operation set
  scores 1 (0/0 := 1). sacrebleu 2.6 ships no SARI, hence this implementation.

The natural-instructions rules (SuperNI tasks; O-LoRA's CL benchmark scorer is the same code):
- ni_exact_match: `normalize_answer` equality (lowercase, every string.punctuation character
  removed, whitespace collapsed; articles are *kept*: its docstring says "adapted from Squad v1.1
  evaluation, without removing the articles"). Since all punctuation goes, "(a" equals "(a)" here,
  by the official rule.
- ni_rouge_l: `rouge_score` RougeScorer(["rougeL"], use_stemmer=True) on the raw strings (its
  default tokenizer lowercases and splits on non-alphanumerics; Porter stems tokens longer than 3).
  For non-ASCII text the official default track drops every non-ASCII character and its xlingual
  track re-tokenizes with GPT-2 BPE; we tokenize by script instead (same as rouge_l), stemming the
  Latin words.

The SLICE authors' rules (evaluation.protocol=slice_paper; as their code, RamiroNB/slice
cl_lora/eval.py, scores), first reference only:
- slice_exact_match: equality after lowercase, strip, whitespace collapse.
- slice_rouge_l: LCS F1 over whitespace tokens of the same normalization, no stemming (a Chinese
  sentence is one token); 0 when either side has no token.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache

from ..data.answers import chosen_label, normalize


def exact_match(
    prediction: str, target: str, labels: Sequence[str] | None = None, *, source: str | None = None
) -> float:
    return float(normalize(prediction) == normalize(target))


def accuracy(prediction: str, target: str, labels: Sequence[str] | None = None, *, source: str | None = None) -> float:
    """Classification accuracy over a label set: "positive." or "Positive, because..." count
    as "positive"; without a label set this is exact match."""
    if not labels:
        return exact_match(prediction, target)
    gold = chosen_label(target, labels)
    return float(gold is not None and chosen_label(prediction, labels) == gold)


# ------------------------------------------------------------------------------- ROUGE-L


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


# Scripts written without spaces between words: every character is a token (the usual ROUGE
# practice for Chinese/Japanese; for Thai, Lao, Khmer and Myanmar a word segmenter would be better,
# but characters are still far better than one token per sentence).
_PER_CHAR_RANGES = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x3134F),  # CJK extensions B-G
)


@lru_cache(maxsize=4096)
def _char_class(ch: str) -> str:
    """'sep' (not part of a word), 'mark' (joins the current word), 'char' (a token by itself),
    'latin', 'digit', or the script name of the character (DEVANAGARI, CYRILLIC, GREEK, ...)."""
    cat = unicodedata.category(ch)
    if cat[0] == "M":
        return "mark"
    if cat[0] not in "LN":
        return "sep"
    cp = ord(ch)
    if any(lo <= cp <= hi for lo, hi in _PER_CHAR_RANGES):
        return "char"
    if cat == "Nd":
        return "digit"
    if ch.isascii():
        return "latin"
    script = unicodedata.name(ch, "UNKNOWN").split(" ")[0]
    return "latin" if script == "LATIN" else script


def _needs_script_tokens(text: str) -> bool:
    """True when `text` has a letter, number or mark outside ASCII (rouge-score would drop it)."""
    return any(not ch.isascii() and unicodedata.category(ch)[0] in "LMN" for ch in text)


def script_tokens(text: str, stemmer=None) -> list[str]:
    """Word tokens of any script: NFKC, lowercase, then runs of letters/digits of one script
    (combining marks such as Devanagari vowel signs stay in their word), one token per character
    for Han, kana, Thai, Lao, Khmer and Myanmar. Latin and digit runs join (rouge-score's
    [a-z0-9]+ tokens); ASCII words longer than 3 letters are stemmed with `stemmer` if given,
    as rouge-score does."""
    text = unicodedata.normalize("NFKC", text).lower()
    tokens: list[str] = []
    run, kind = [], None

    def close() -> None:
        if run:
            word = "".join(run)
            if stemmer is not None and kind == "latin" and word.isascii() and len(word) > 3:
                word = stemmer.stem(word)
            tokens.append(word)
        run.clear()

    for ch in text:
        cls = _char_class(ch)
        if cls == "mark":
            if run:
                run.append(ch)
            continue
        if cls == "sep":
            close()
            kind = None
            continue
        joinable = kind == cls or {kind, cls} == {"latin", "digit"}
        if cls == "char" or kind == "char" or not joinable:
            close()
            kind = cls
        elif kind == "digit" and cls == "latin":
            kind = "latin"
        run.append(ch)
    close()
    return tokens


class ScriptTokenizer:
    """rouge-score tokenizer interface (`tokenize(text) -> list[str]`) over `script_tokens`."""

    def __init__(self, use_stemmer: bool = False):
        from nltk.stem import porter  # the stemmer rouge-score itself uses

        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        return script_tokens(text, self._stemmer)


@lru_cache(maxsize=4)
def _rouge_scorer(use_stemmer: bool, by_script: bool):
    from rouge_score import rouge_scorer

    tokenizer = ScriptTokenizer(use_stemmer) if by_script else None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer, tokenizer=tokenizer)


def rouge_l_f1(prediction: str, target: str, *, use_stemmer: bool = False) -> float:
    """ROUGE-L F1 by rouge-score; its own tokenizer when both strings are ASCII-only, else the
    script tokenizer for both (decided on the pair, so both sides are tokenized alike)."""
    by_script = _needs_script_tokens(prediction) or _needs_script_tokens(target)
    return float(_rouge_scorer(use_stemmer, by_script).score(target, prediction)["rougeL"].fmeasure)


def rouge_l(prediction: str, target: str, labels: Sequence[str] | None = None, *, source: str | None = None) -> float:
    """ROUGE-L F1 without stemming (cl_bench; TRACE MeetingBank, Alpaca GP/IP). Both empty = 1."""
    if not prediction.strip() and not target.strip():
        return 1.0
    return rouge_l_f1(prediction, target)


# ------------------------------------------------------------- natural-instructions rules


def normalize_answer(text: str) -> str:
    """natural-instructions `normalize_answer`: lowercase, remove string.punctuation, collapse
    whitespace (articles kept)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(text.split())


def ni_exact_match(
    prediction: str, target: str, labels: Sequence[str] | None = None, *, source: str | None = None
) -> float:
    return float(normalize_answer(prediction) == normalize_answer(target))


def ni_rouge_l(
    prediction: str, target: str, labels: Sequence[str] | None = None, *, source: str | None = None
) -> float:
    """natural-instructions ROUGE-L: rouge-score with stemming on the raw strings."""
    return rouge_l_f1(prediction, target, use_stemmer=True)


# ------------------------------------------------------------------ the SLICE authors' rules


def slice_normalize(text: str) -> str:
    """The SLICE authors' `_normalize_text`: lowercase, strip, collapse whitespace."""
    return " ".join(text.lower().strip().split())


def slice_exact_match(
    prediction: str, target: str, labels: Sequence[str] | None = None, *, source: str | None = None
) -> float:
    return float(slice_normalize(prediction.strip()) == slice_normalize(target.strip()))


def slice_rouge_l(
    prediction: str, target: str, labels: Sequence[str] | None = None, *, source: str | None = None
) -> float:
    return lcs_f1(slice_normalize(prediction).split(), slice_normalize(target).split())


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


def edit_similarity(
    prediction: str, target: str, labels: Sequence[str] | None = None, *, source: str | None = None
) -> float:
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
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


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
        f_keep, p_del, f_add = sari_ngram_scores(_ngrams(src_t, n), _ngrams(pred_t, n), [_ngrams(r, n) for r in refs_t])
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
    "ni_exact_match": ni_exact_match,
    "ni_rouge_l": ni_rouge_l,
    "slice_exact_match": slice_exact_match,
    "slice_rouge_l": slice_rouge_l,
}
# Scored against every reference, keeping the best (natural-instructions metric_max_over_ground_truths).
MAX_OVER_REFERENCES = frozenset(
    {"exact_match", "accuracy", "rouge_l", "edit_similarity", "ni_exact_match", "ni_rouge_l"}
)
# The SLICE authors kept only the first reference of an instance.
FIRST_REFERENCE_ONLY = frozenset({"slice_exact_match", "slice_rouge_l"})


def score(
    metric: str,
    prediction: str,
    target: str | Sequence[str],
    labels: Sequence[str] | None = None,
    *,
    source: str | None = None,
    **extra,
) -> float:
    """Score one prediction against one reference or a sequence of references (the first being
    the training target). `source` is used by SARI and ignored by the other metrics."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(sorted(METRICS))}") from None
    if extra:
        raise TypeError(
            f"score(): unexpected keyword(s) {', '.join(sorted(extra))}; metrics take only labels and source"
        )
    references = [target] if isinstance(target, str) else list(target)
    if not references:
        raise ValueError("score(): no reference to score against")
    if metric == "sari":
        if source is None:
            return sari(prediction, references[0], labels, source=source)  # raises the message below
        return sari_multi(source, prediction, references)
    if metric in FIRST_REFERENCE_ONLY:
        references = references[:1]
    return max(fn(prediction, ref, labels, source=source) for ref in references)

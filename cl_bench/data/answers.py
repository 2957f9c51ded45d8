"""Answer text: cl_bench's normalization and which label an answer names.

Shared by the task loaders (a multiple-choice answer must name an option) and by scoring
(evaluation/scoring.py), so both read an answer the same way. Pure string functions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_WS = re.compile(r"\s+")
# Trailing sentence punctuation a model may add after an answer ("positive." / "Paris!").
_TRAILING = ".,;:!?"


def normalize(text: str) -> str:
    """cl_bench's answer normalization: lowercase, strip, collapse whitespace, drop trailing
    sentence punctuation (. , ; : ! ?). Brackets and quotes are kept: "(a" and "(a)" differ."""
    text = _WS.sub(" ", text.strip().lower())
    return text.rstrip(_TRAILING + " ").strip()


# "Answer: B" / "answer:B" — the part after the marker is the choice (TRACE ScienceQA format).
_ANSWER_MARKER = re.compile(r"\banswer\s*:\s*", re.IGNORECASE)


def chosen_label(text: str, labels: Sequence[str]) -> str | None:
    """The label `text` answers with: after an "Answer:" marker if there is one, the longest
    label the answer starts with as a whole word ("B. because" -> B, "Because" -> none)."""
    marker = _ANSWER_MARKER.search(text)
    answer = normalize(text[marker.end() :] if marker else text)
    for label in sorted(labels, key=len, reverse=True):
        norm = normalize(label)
        if not norm:
            continue
        if answer == norm or (answer.startswith(norm) and not answer[len(norm)].isalnum()):
            return norm
    return None

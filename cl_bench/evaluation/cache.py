"""A content-keyed on-disk cache of greedy predictions, for a model that every run of a sweep
evaluates alike: the base model of row 0 (run/runner.py uses it there only).

An entry is the decoded predictions of one task's evaluation, keyed by SHA-256 over everything
that decides them (never over paths or run names):
* the model: `model_key`, which the caller derives from the weights' content, the model config,
  dtype, device type, attention kernel and the torch / transformers versions;
* the decoding: the tokenizer's vocabulary and special tokens (ids -> text);
* the work: every prompt's token ids after rendering and truncation (which pins the eval examples,
  the prompt format, the chat template, the system message and max_prompt_len), the batch plan
  (which prompts share a generation batch), the new-token budget, the end and pad token ids.
Scores are not cached: they are recomputed from the predictions, so a change of scoring never
serves stale numbers. A hit gives the predictions a run with the same key computed, so the
matrix, the predictions files and results.json are the same as without the cache (tested).
The thread count is not part of the key (as for the init cache): generation on another number
of threads could in principle break a near-tie of two tokens the other way.

Files are written to a temporary name and renamed, so parallel jobs never read a partial entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Bump when what an entry means changes (decoding, what a prediction is).
PREDICTION_CACHE_VERSION = 1


def digest(*parts: Any) -> str:
    """SHA-256 hex of JSON-serialisable parts (sorted keys)."""
    payload = json.dumps([PREDICTION_CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def tokenizer_key(tokenizer) -> str:
    """What decoding depends on: the tokenizer class, its vocabulary and its special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return digest(type(tokenizer).__name__, vocab, sorted(map(int, tokenizer.all_special_ids)))


class PredictionCache:
    """Predictions of one model by content key under `root/<key[:2]>/<key>.json`.

    `model_key` identifies the model (see the module doc); `log` gets one line per hit or store."""

    def __init__(self, root: str | os.PathLike, model_key: str, tokenizer, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.model_key = model_key
        self.decoder_key = tokenizer_key(tokenizer)
        self.log = log

    def key(self, *, rows: list[list[int]], plan: list[list[int]], budget: int, end_ids: list[int], pad_id: int) -> str:
        """The entry key of one task's generation (module doc)."""
        return digest("predictions", self.model_key, self.decoder_key, rows, plan, int(budget), end_ids, int(pad_id))

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def load(self, key: str, n: int) -> list[str] | None:
        """The cached predictions (None on a miss, or when the entry is unreadable or not `n` long)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            predictions = json.loads(path.read_text())["predictions"]
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a corrupt entry is recomputed, never trusted
            self.log(f"cache: ignoring unreadable predictions entry {path} ({exc})")
            return None
        if not isinstance(predictions, list) or len(predictions) != n:
            return None
        self.log(f"cache hit: predictions {key[:12]} ({path})")
        return [str(p) for p in predictions]

    def save(self, key: str, predictions: list[str], meta: dict | None = None) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:12]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"predictions": list(predictions), "meta": meta or {}}, fh)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.log(f"cache store: predictions {key[:12]} ({path})")

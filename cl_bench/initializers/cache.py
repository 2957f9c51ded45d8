"""Content-keyed on-disk cache for gradient captures and init factors (safetensors, no pickle).

A key is a SHA-256 over what determines the content, never over paths or run names:
* a capture: the model state (every non-LoRA parameter, plus the LoRA ones if an adapter is
  not a no-op), the model class, the target modules, and the exact token batches used
  (which pins the task examples drawn, the tokenizer, max length, capture steps, batch size
  and seed). Not c, the operator, α or r: they act after the capture, so a sweep over them
  that shares a model state (always true at stage 1) captures once.
* an init: the capture keys plus every knob that acts after the capture.

Files are written to a temporary name and renamed, so concurrent multirun jobs never read a
partial file; the worst case is that two jobs compute the same entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# Bump when the meaning of a cached entry changes (loss, mode, layout, selection rule).
# 2: captures are token means over all capture batches (was: mean of per-batch means).
# 3: the model-state fingerprint hashes per-parameter digests (computed in parallel).
# 4: singular pairs in one sign convention (linalg.canonical_signs): LoRA-GA/SLICE inits change sign per pair.
CACHE_VERSION = 4


def _update_with_tensor(h: hashlib._Hash, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
    flat = t.reshape(-1).contiguous().cpu()
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())  # buffer protocol: no extra bytes copy


def model_state_fingerprint(model: torch.nn.Module, workers: int | None = None) -> str:
    """SHA-256 over the parameters that define the function being differentiated.

    LoRA parameters are skipped while every lora_B is zero (the adapter is then a no-op and
    its random A does not affect the gradient w.r.t. W); otherwise they are included.
    Each parameter is hashed in its own thread (hashlib releases the GIL), then the digests are
    hashed in order: a 3B model's 6 GB take ~4 s on one core, a fraction of that on `workers`
    (default: torch's CPU threads) cores.
    """
    named = list(model.named_parameters())
    adapter_is_noop = all(not bool(p.detach().any()) for n, p in named if "lora_B" in n)
    items = [(n, p) for n, p in named if not ("lora_" in n and adapter_is_noop)]

    def digest(item) -> bytes:
        name, p = item
        h = hashlib.sha256(name.encode())
        _update_with_tensor(h, p)
        return h.digest()

    with ThreadPoolExecutor(max_workers=max(1, workers or torch.get_num_threads())) as pool:
        digests = list(pool.map(digest, items))
    return hashlib.sha256(b"".join(digests)).hexdigest()


def batches_fingerprint(batches: Iterable[dict[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for i, batch in enumerate(batches):
        h.update(f"batch{i}".encode())
        for k in sorted(batch):
            h.update(k.encode())
            _update_with_tensor(h, batch[k])
    return h.hexdigest()


def content_key(*parts: Any) -> str:
    """SHA-256 of JSON-serialisable parts (sorted keys), prefixed by the cache version."""
    payload = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class TensorCache:
    """dict[str, Tensor] + JSON metadata per key under `root/<kind>/<key[:2]>/<key>.safetensors`.

    `root=None` turns the cache off: `load` always misses and `save` does nothing.
    `dist` (distributed.Dist): every rank must take the same branch (a capture is a collective),
    so rank 0 decides hit or miss for all and only rank 0 stores.
    """

    def __init__(self, root: str | os.PathLike | None, log: Callable[[str], None] = print, dist=None):
        self.root = Path(root) if root else None
        self.log = log
        self.dist = dist if dist is not None and dist.world > 1 else None

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def path(self, kind: str, key: str) -> Path:
        assert self.root is not None
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def load(
        self, kind: str, key: str, device: torch.device | str = "cpu"
    ) -> tuple[dict[str, torch.Tensor], dict] | None:
        if not self.enabled:
            return None
        path = self.path(kind, key)
        exists = path.exists()
        if self.dist is not None:
            exists = self.dist.broadcast_object(exists, "the cache lookup")
        if not exists:
            return None
        try:
            tensors = load_file(str(path), device=str(device))
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        except Exception as exc:  # a corrupt entry is recomputed, never trusted
            self.log(f"cache: ignoring unreadable {kind} entry {path} ({exc})")
            tensors = None
        if self.dist is not None and not all(self.dist.gather(tensors is not None, "the cache read")):
            return None  # one rank could not read it: all recompute
        if tensors is None:
            return None
        self.log(f"cache hit: {kind} {key[:12]} ({path})")
        return tensors, meta

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Path | None:
        if not self.enabled or self.dist is not None and not self.dist.is_main:
            return None
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:12]}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(payload, tmp, metadata={"meta": json.dumps(meta or {}, default=str)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.log(f"cache store: {kind} {key[:12]} ({path})")
        return path

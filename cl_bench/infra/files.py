"""Run-directory files: atomic writes, results.json, package versions."""

from __future__ import annotations

import json
import math
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

SCHEMA = 1
TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "peft",
    "accelerate",
    "datasets",
    "lm_eval",
    "hydra-core",
    "omegaconf",
    "safetensors",
    "numpy",
    "rouge-score",
    "wandb",
)


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become null (strict JSON), tensors and numpy scalars become numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers never see a partial file."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` fills a temp file in the same folder; it is then fsynced and renamed to `path`,
    so readers never see a partial file; on any error the temp file is removed. Ctrl-C / SIGTERM
    wait until the file is in place."""
    from .interrupt import critical

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with critical():  # Ctrl-C / SIGTERM wait until the write is complete
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n").encode())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata_: dict[str, str] | None = None) -> None:
    """safetensors file of `tensors` (+ string metadata), atomically (atomic_write). Written by
    safetensors straight into the file: no second in-memory copy of every tensor as one bytes
    object (the same bytes as `safetensors.torch.save`; tested)."""
    from safetensors.torch import save_file

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata_))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    import sys

    out["python"] = sys.version.split()[0]
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(_clean(r), ensure_ascii=False) + "\n" for r in records))


def git_state(repo: Path | None = None) -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None} of the cl_bench checkout (None outside git)."""
    import subprocess

    repo = Path(repo or Path(__file__).resolve().parents[2])

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def provenance(device: torch.device) -> dict[str, Any]:
    """Where and from what code a run was made: cl_bench's git commit (+ dirty flag), host, device."""
    import platform

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            models = [
                l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines() if l.startswith("model name")
            ]
            name = f"{models[0]} ({len(models)} cores)" if models else name
    return {"cl_bench": git_state(), "host": platform.node(), "device": str(device), "device_name": name}

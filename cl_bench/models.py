"""Model and tokenizer loading: one code path (`from_pretrained`) for the tiny model, local
paths and Hub names alike."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, ModelLoadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is available; valid here: auto, cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"device={name!r} is not valid; valid: auto, cpu, cuda, cuda:N")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` = bf16 on CUDA devices that support it, fp32 otherwise."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not valid; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_model_path(model_cfg: Any, cache_dir: str | None, log=print) -> str:
    """The tiny model is built on first use; anything else is a Hub name or a local path."""
    if model_cfg.get("builder") == "tiny":
        from .tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(cache_dir, log=log))
    return str(model_cfg.name_or_path)


def model_unavailable(path: str) -> ModelLoadError:
    if Path(path).exists():
        return ModelLoadError(f"model.name_or_path={path!r} is a folder but not a loadable model (needs config.json, weights, tokenizer)")
    offline = " (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return ModelLoadError(
        f"model {path!r} is not on disk and could not be downloaded{offline}; download it once "
        f"(huggingface-cli download {path} --local-dir DIR) and set model.name_or_path=DIR"
    )


def load_model(model_cfg: Any, device: torch.device, cache_dir: str | None = None, log=print):
    """(model, tokenizer) on `device`, in eval mode; a one-line ModelLoadError if unavailable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model_cfg, cache_dir, log=log)
    dtype = resolve_dtype(str(model_cfg.get("dtype", "auto")), device)
    trust = bool(model_cfg.get("trust_remote_code", False))  # only when the model config says so
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust)
    except (OSError, ValueError):
        raise model_unavailable(path) from None
    if tokenizer.pad_token_id is None:
        # Padding needs an id; the attention mask and label masking make its value irrelevant.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(device)
    model.eval()
    return model, tokenizer

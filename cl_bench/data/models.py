"""Model and tokenizer loading: one code path (`from_pretrained`) for the tiny model, local
paths and Hub names alike."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..infra.errors import ConfigError, ModelLoadError
from .gguf import converted_folder, gguf_source

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


TINY = "tiny"
# transformers' attention kernels: sdpa = torch's scaled_dot_product_attention (flash / memory-
# efficient kernels on CUDA), flash_attention_2 needs the flash-attn package, null = the model's default.
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager", None)


def resolve_model_path(model_cfg: Any, cache_dir: str | None, log=print) -> str:
    """The tiny model is built on first use; a GGUF file (`model.gguf_file`) is converted on first
    use (data/gguf.py); anything else is a Hub name or a local path.

    A `model.name_or_path` the user set is honoured whatever the group: `model=tiny` builds the
    tiny model only while its name_or_path is still "tiny"."""
    name = model_cfg.get("name_or_path")
    gguf = gguf_source(model_cfg)
    if gguf is not None:  # a llama.cpp file: converted once into the cache, then an ordinary HF folder
        from .tiny_model import default_cache_root

        return str(converted_folder(gguf, cache_dir or default_cache_root(), log=log))
    if model_cfg.get("builder") == TINY and name in (None, "", TINY):
        from .tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(cache_dir, log=log))
    if name in (None, ""):
        raise ConfigError("model.name_or_path is empty; set it to a HF model name or a local folder")
    return str(name)


def model_unavailable(path: str) -> ModelLoadError:
    if Path(path).exists():
        return ModelLoadError(
            f"model.name_or_path={path!r} is a folder but not a loadable model (needs config.json, weights, tokenizer)"
        )
    if Path(path).is_absolute() or path.startswith((".", "~")) or path.count("/") != 1:
        return ModelLoadError(f"model.name_or_path={path!r}: no such folder (nor a Hub name of the form org/name)")
    offline = " (offline)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return ModelLoadError(
        f"model {path!r} is not on disk and could not be downloaded{offline}; download it once "
        f"(hf download {path} --local-dir DIR) and set model.name_or_path=DIR"
    )


def load_model(
    model_cfg: Any,
    device: torch.device,
    cache_dir: str | None = None,
    log=print,
    place: bool = True,
    weights: bool = True,
):
    """(model, tokenizer) on `device`, in eval mode; a one-line ModelLoadError if unavailable.
    `place=False`: in `device`'s dtype but left on the CPU (distributed=fsdp moves each rank's
    shards to the device as it shards, so no GPU ever holds the whole model).
    `weights=False`: the same model built from its config on the meta device, no weights read
    (distributed=fsdp ranks > 0: rank 0 reads the checkpoint and broadcasts the shards); its
    generation config is the checkpoint's, as from_pretrained would set it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = resolve_model_path(model_cfg, cache_dir, log=log)
    dtype = resolve_dtype(str(model_cfg.get("dtype", "auto")), device)
    trust = bool(model_cfg.get("trust_remote_code", False))  # only when the model config says so
    attn = model_cfg.get("attn_implementation", "sdpa")
    if attn not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            f"model.attn_implementation={attn!r} is not valid; valid: {', '.join(map(str, ATTN_IMPLEMENTATIONS))}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except (OSError, ValueError):
        raise model_unavailable(path) from None
    kwargs = {"attn_implementation": attn} if attn else {}
    try:
        if weights:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust, **kwargs)
        else:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust, **kwargs)
            model.config._name_or_path = str(path)
            try:
                model.generation_config = GenerationConfig.from_pretrained(path)
            except OSError:  # no generation_config.json: from_pretrained keeps the one from the model config too
                pass
    except ImportError as exc:  # flash_attention_2 without the flash-attn package
        raise ConfigError(f"model.attn_implementation={attn}: {str(exc).splitlines()[0]}; use sdpa") from None
    except (OSError, ValueError) as exc:
        if attn and any(word in str(exc).lower() for word in ("attn", "attention")):
            raise ConfigError(
                f"model.attn_implementation={attn} is not supported by {path}: "
                f"{str(exc).splitlines()[0]}; set model.attn_implementation=null (the model's default)"
            ) from None
        raise model_unavailable(path) from None
    log(
        f"model {path}: {type(model).__name__}, {dtype}, attention {model.config._attn_implementation}"
        + ("" if weights else "; built on the meta device, its weights come from rank 0")
    )
    if tokenizer.pad_token_id is None:
        # Padding needs an id; the attention mask and label masking make its value irrelevant.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if place:
        model.to(device)
    model.eval()
    return model, tokenizer

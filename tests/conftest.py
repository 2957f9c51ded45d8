"""Shared fixtures: single-threaded torch, the tiny model (built once per cache), the real data samples
(helpers.SHARED_DATA: an optional data folder in README's layout beside the repository; tests that
need them skip cleanly without). Helpers that are not fixtures (compose, run_cli, FAST) live in
tests/helpers/."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import CACHE, SHARED_DATA  # noqa: E402  (sets the test environment first)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: multithreaded kernels only add synchronisation, most of all on a busy machine.
    Use with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from cl_bench.data.tiny_model import ensure_tiny_model

    return ensure_tiny_model(CACHE)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) of the tiny model on CPU. Tests must not modify the model in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, tok


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA} (an optional data folder in README's layout)")
    return SHARED_DATA

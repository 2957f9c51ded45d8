"""Atomic run-dir files: safetensors written straight into the temp file are the bytes
`safetensors.torch.save` makes, and a failed write leaves nothing behind."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from cl_bench.infra.files import atomic_save_tensors, atomic_write, atomic_write_json


def test_atomic_save_tensors_writes_the_bytes_of_safetensors_save(tmp_path):
    tensors = {
        "w.weight": torch.randn(33, 7),
        "ids": torch.arange(10),
        "half": torch.randn(3, 4).to(torch.bfloat16),
        "view": torch.randn(8, 8)[:, 2],  # not contiguous
    }
    path = tmp_path / "x" / "state.safetensors"
    atomic_save_tensors(path, tensors, {"stage": "1"})
    assert path.read_bytes() == save({k: v.contiguous() for k, v in tensors.items()}, metadata={"stage": "1"})
    assert [p.name for p in path.parent.iterdir()] == ["state.safetensors"]  # no temp file left


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"a": 1})

    def broken(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("{partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]

"""Run-dir files: a truncated or empty file is one line naming it and what to do (no raw
SafetensorError), and an in-stage checkpoint is replaced as a set, so a kill between its files
never pairs a new adapter with an older optimizer state."""

from __future__ import annotations

import os

import pytest
import torch

from cl_bench.infra.errors import RunDirError
from cl_bench.lora.layers import WeightMaster
from cl_bench.run import store as store_module
from cl_bench.run.store import (
    RunStore,
    load_model_state,
    load_stage_record,
    save_checkpoint,
    save_model_state,
    save_stage_record,
)
from cl_bench.train.trainer import TrainState
from helpers.small import TARGETS, small_llama


def one_line(err) -> str:
    line = str(err.value)
    assert "\n" not in line
    return line


def test_a_truncated_adapter_and_an_empty_model_state_name_the_file(tmp_path):
    files = RunStore(tmp_path).stage(1)
    factors = {"m": (torch.randn(2, 4), torch.randn(4, 2))}
    save_stage_record(files, 1, "t", "stage_01", factors, None, {"m": 1.0})
    data = files.adapter.read_bytes()
    files.adapter.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunDirError) as err:
        load_stage_record(files)
    line = one_line(err)
    assert str(files.adapter) in line and "damaged or truncated" in line and "hydra.run.dir" in line

    model = small_llama()
    save_model_state(files, model, TARGETS, WeightMaster.attach(model, TARGETS))
    files.model_state.write_bytes(b"")
    with pytest.raises(RunDirError) as err:
        load_model_state(files, model, TARGETS, WeightMaster.attach(model, TARGETS))
    assert str(files.model_state) in one_line(err)


def _checkpoint(files, model, step):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=torch.ones(1, 4, dtype=torch.long)).logits.sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    save_checkpoint(files, model, TrainState(step=step), opt, sched, {})
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_kill_between_the_files_of_a_checkpoint_keeps_the_last_complete_set(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    files = store.stage(1)
    model = small_llama()
    first = _checkpoint(files, model, step=1)
    real_save = store_module.atomic_save_tensors

    def dies_at_the_optimizer(path, *args, **kwargs):
        if path.name == "optimizer.safetensors":
            raise KeyboardInterrupt  # kill -9 after the new adapter was written
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(store_module, "atomic_save_tensors", dies_at_the_optimizer)
    with pytest.raises(KeyboardInterrupt):
        _checkpoint(files, model, step=2)
    monkeypatch.undo()
    fresh = small_llama(seed=5)
    state, _ = store.load_checkpoint(1, fresh, {})
    assert state.step == 1
    for n, p in fresh.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, first[n]), n  # step 1's adapter, with step 1's optimizer state


def test_a_kill_between_the_renames_resumes_from_the_newest_complete_set(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    files = store.stage(1)
    model = small_llama()
    _checkpoint(files, model, step=1)
    real_replace, calls = os.replace, []

    def dies_at_the_second_rename(src, dst):  # of a folder (file writes rename too)
        if os.path.isdir(src):
            calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "replace", dies_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        _checkpoint(files, model, step=2)
    monkeypatch.undo()
    second = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert not files.checkpoint.exists()  # killed with the old set moved aside, the new one not yet in place
    fresh = small_llama(seed=5)
    state, _ = store.load_checkpoint(1, fresh, {})
    assert state.step == 2 and sorted(p.name for p in files.dir.iterdir()) == ["checkpoint"]
    for n, p in fresh.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, second[n]), n


def test_a_damaged_checkpoint_file_says_how_to_restart_the_stage(tmp_path):
    store = RunStore(tmp_path)
    files = store.stage(1)
    _checkpoint(files, small_llama(), step=1)
    (files.checkpoint / "optimizer.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(RunDirError) as err:
        store.load_checkpoint(1, small_llama(), {})
    line = one_line(err)
    assert "optimizer.safetensors" in line and f"delete {files.checkpoint}" in line

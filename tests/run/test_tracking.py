"""W&B keeps the whole history through kill -9: a resumed run re-logs what results.json holds
beyond what the W&B run held when it was last closed (cl_bench_logged.json), and an exactly
resumed stage does not log the steps W&B already holds twice."""

from __future__ import annotations

import json
import struct
import sys
import types
from pathlib import Path

import pytest

from cl_bench.run.tracking import LEDGER, WandbTracker, saved_history
from helpers import FAST, run_cli

T = 2  # tasks of the toy results


class FakeWandb(types.ModuleType):
    """wandb as it behaves offline: what a run logs is kept only once the run is finished (a kill
    -9 before that loses it); `held` is what the W&B run holds, in order."""

    def __init__(self):
        super().__init__("wandb")
        self.held: list[dict] = []

    def init(self, **kw):
        return FakeRun(self, kw["id"])


class FakeRun:
    def __init__(self, wandb: FakeWandb, run_id: str):
        self.wandb, self.id, self.buffer, self.name, self.job_type = wandb, run_id, [], "run", "method"

    def define_metric(self, *a, **kw): ...

    def log(self, row):
        self.buffer.append(dict(row))

    def finish(self, exit_code=0):
        self.wandb.held += self.buffer


@pytest.fixture
def wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def results_after(stages: int) -> dict:
    """results.json of a two-stage toy run (3 steps a stage) with rows 0..stages saved."""
    matrix = [[10.0 * i + j for j in range(T)] if i <= stages else [None] * T for i in range(T + 1)]
    records = [
        {"stage": s, "train": {"steps": 3, "loss_curve": [s + 0.1 * k for k in range(1, 4)]}}
        for s in range(1, stages + 1)
    ]
    config = {"seed": 0, "lora": {"r": 4}}
    return {"config": config, "sequence": "toy", "tasks": ["a", "b"], "matrix": matrix, "stages": records}


def process(run_dir, results, steps=(), stage=None, close=False):
    """One cl_bench process: opens the tracker on `results` (what it resumes from), logs training
    steps `steps` of `stage`, saves that stage's row (when `stage`), closes (or is killed)."""
    tracker = WandbTracker({"wandb": True}, results, run_dir)
    for step in steps:
        tracker.log_step(stage, step, {"lm": stage + 0.1 * step, "lr": 1e-3})
    if stage is not None:
        tracker.log_stage(stage, results_after(stage))
    if close:
        tracker.close()


def history(held):
    rows = [r["stage"] for r in held if "stage" in r]
    steps = [r["train/global_step"] for r in held if "train/global_step" in r]
    return rows, steps


def test_saved_history_is_rows_and_steps_in_order():
    assert list(saved_history(results_after(1))) == [(0, None, None), (1, 1, 1.1), (1, 2, 1.2), (1, 3, 1.3)] + [
        (1, None, None)
    ]
    partial = results_after(0) | {"matrix": [[1.0, None], [None] * T, [None] * T]}
    assert list(saved_history(partial)) == []  # row 0 cut by an interrupt: not saved


def test_kill_9_then_resume_logs_every_row_and_step_once(wandb, tmp_path):
    process(tmp_path, results_after(0) | {"matrix": [[None] * T] * (T + 1)}, stage=0, close=False)
    process(tmp_path, results_after(0), steps=[1, 2, 3], stage=1, close=False)  # killed after row 1
    assert wandb.held == []  # what today's offline W&B file holds after the kill
    process(tmp_path, results_after(1), steps=[1, 2, 3], stage=2, close=True)
    assert history(wandb.held) == ([0, 1, 2], [1, 2, 3, 4, 5, 6])
    assert json.loads((tmp_path / "wandb" / LEDGER).read_text())["stage"] == 2


def test_a_closed_run_is_not_logged_twice_and_an_in_stage_resume_fills_the_gap(wandb, tmp_path):
    # Ctrl-C in stage 1 after step 2 (W&B closed, holds steps 1-2); the checkpoint was at step 1
    process(tmp_path, results_after(0) | {"matrix": [[None] * T] * (T + 1)}, stage=0, close=False)
    tracker = WandbTracker({"wandb": True}, results_after(0), tmp_path)
    tracker.log_step(1, 1, {"lm": 1.1})
    tracker.log_step(1, 2, {"lm": 1.2})
    tracker.close()
    assert history(wandb.held) == ([0], [1, 2])  # row 0 re-logged from results.json
    # resumed at the checkpoint (step 1): reruns steps 2-3; then killed -9 after stage 1's row
    process(tmp_path, results_after(0), steps=[2, 3], stage=1, close=False)
    assert history(wandb.held) == ([0], [1, 2])
    # resumed once more at stage 2
    process(tmp_path, results_after(1), steps=[1, 2, 3], stage=2, close=True)
    assert history(wandb.held) == ([0, 1, 2], [1, 2, 3, 4, 5, 6])


def test_a_ledger_of_another_wandb_run_is_ignored(wandb, tmp_path):
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / LEDGER).write_text(json.dumps({"id": "other", "stage": 2, "global_step": 6}))
    process(tmp_path, results_after(1), steps=[1, 2, 3], stage=2, close=True)
    assert history(wandb.held) == ([0, 1, 2], [1, 2, 3, 4, 5, 6])


# --------------------------------------------------------------------------- the real wandb, offline
def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file (run-<id>.wandb): a 7-byte header, then records
    in LevelDB log format (32 KiB blocks; chunk header: crc32, length, type), each a protobuf
    Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, rows = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block trailer
            pos += left
            continue
        buf = (b"" if kind in (1, 2) else buf) + data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or its last chunk
            record = pb.Record.FromString(buf)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.mark.slow
def test_offline_wandb_killed_and_resumed_holds_the_whole_history(tmp_path, tiny_model_dir):
    args = [*FAST, "sequence.tasks=[sentiment,parity]", "logger=wandb", f"hydra.run.dir={tmp_path}"]
    env = {"WANDB_MODE": "offline"}
    killed = run_cli(args, env_extra=env | {"CL_BENCH_KILL_AT": "saved:1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(args, env_extra=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # `wandb sync` uploads them in this order
    held = [row for f in files for row in wandb_history(f)]
    rows, steps = history(held)
    assert sorted(set(rows)) == [0, 1, 2] and sorted(set(steps)) == list(range(1, 13))
    # What wandb wrote before the kill may come again from the resume (the module's docstring), but
    # only as the same row of R, and the same loss to the 5 digits results.json keeps.
    first_row, first_loss = {}, {}
    for r in held:
        if "stage" in r:
            row = {k: v for k, v in r.items() if k.startswith("eval/")}
            assert first_row.setdefault(r["stage"], row) == row
        if "train/global_step" in r:
            loss = first_loss.setdefault(r["train/global_step"], r["train/lm"])
            assert r["train/lm"] == pytest.approx(loss, abs=1e-5)
    assert len(rows) + len(steps) < 2 * (3 + 12)  # not the whole history twice

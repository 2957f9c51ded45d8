"""The first hour at the command line: a readable console, a summary that says what happened,
offline detection that costs no Hub retries, and a user-set model path that is honoured
(Ctrl-C / SIGTERM and their resume: test_reliability.py)."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from helpers import FAST, REPO, run_cli

pytestmark = pytest.mark.slow

ARGS = FAST + [
    "sequence=synthetic_conflict",
    "sequence.tasks=[sentiment,parity]",
    "initializer=slice",
    "initializer.capture_steps=2",
    "initializer.capture_batch_size=4",
    "general_eval=synthetic",
    "general_eval.limit=8",
    "threads=1",
]


@pytest.fixture(scope="module")
def slice_run(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref")
    proc = run_cli(ARGS + [f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir, proc, json.loads((run_dir / "results.json").read_text())


def test_console_shows_cl_bench_lines_only_and_the_log_keeps_the_rest(slice_run):
    run_dir, proc, _ = slice_run
    console = proc.stdout + proc.stderr
    for line in (
        "stage 0/2 eval: sentiment",
        "stage 1/2 init slice: skipped: no previous task",
        "stage 1/2 train sentiment: 6 steps",
        "stage 2/2 eval: sentiment",
        "stage 0/2 general: GP",
        "synthetic_odd_one_out",
    ):
        assert line in console, line
    for noise in ("it/s", "FutureWarning", "Running loglikelihood", "[INFO]", "Traceback", "cache store"):
        assert noise not in console, noise
    log = (run_dir / "cl_bench.log").read_text()
    assert "Running loglikelihood requests: 100%" in log  # lm-eval's bars, final state only
    assert "[third_party][INFO]" in log and "stage 2/2 train parity" in log
    assert "== synthetic_conflict: results matrix" in log  # the summary too


def test_summary_says_what_happened(slice_run):
    run_dir, proc, results = slice_run
    out = proc.stdout
    assert "gradient projection at init:" in out
    assert "stage 1 (sentiment): skipped: no previous task" in out
    assert re.search(r"stage 2 \(parity\): (not )?fired.*\[cos=[+-]\d\.\d{4}", out), out
    assert re.search(r"^chance\s+50\.0\s+50\.0$", out, re.M)
    for line in (
        f"run dir:     {run_dir}",
        f"results:     {run_dir / 'results.json'}",
        f"predictions: {run_dir / 'predictions'}/stage_XX/<task>.jsonl",
        f"report:      python -m cl_bench.report {run_dir}",
    ):
        assert line in out, line
    prov = results["provenance"]
    assert re.fullmatch(r"[0-9a-f]{40}", prov["cl_bench"]["commit"]) and isinstance(prov["cl_bench"]["dirty"], bool)
    assert prov["host"] and prov["device"] == "cpu"
    assert results["baselines"]["sentiment"]["chance"] == 50.0
    stage2 = results["stages"][1]["init"]
    assert ("not fired" in stage2["projection"]) == (not stage2["fired"])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def test_offline_is_detected_once_and_a_missing_model_fails_at_once(tiny_model_dir, tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "cl_bench", "model=llama3_2_3b_instruct", f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert time.time() - start < 60  # no retry loop (it was minutes)
    assert proc.stdout.count("offline: the Hugging Face Hub") == 1
    (error,) = proc.stderr.strip().splitlines()
    assert error.startswith("cl_bench: error: model 'meta-llama/Llama-3.2-3B-Instruct' is not on disk")
    assert error.endswith("(README.md: 'Getting a model')")
    assert "Retrying" not in (tmp_path / "cl_bench.log").read_text()


def test_offline_check_is_fast_and_sets_every_switch():
    from cl_bench.data.hub import OFFLINE_VARS, decide_offline

    env = {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    start = time.time()
    offline, line = decide_offline(env, timeout=1.0)
    assert offline and time.time() - start < 1.5 and "not reachable" in line
    assert all(env[v] == "1" for v in OFFLINE_VARS)
    user_set = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://10.255.255.1:1"}  # never contacted
    start = time.time()
    assert decide_offline(user_set, timeout=5.0)[0] and time.time() - start < 0.1


def test_user_set_name_or_path_is_honoured_whatever_the_model_group(tiny_model_dir):
    from cl_bench.data.models import resolve_model_path
    from helpers import compose

    for group in ("tiny", "llama3_2_3b_instruct"):
        cfg = compose([f"model={group}", "model.name_or_path=/elsewhere/my-model"])
        assert resolve_model_path(cfg.model, None) == "/elsewhere/my-model"
    assert resolve_model_path(compose([]).model, str(tiny_model_dir.parent)) == str(tiny_model_dir)

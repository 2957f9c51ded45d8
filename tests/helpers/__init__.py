"""Test helpers that are not fixtures: paths, the test environment, Hydra composition exactly as the
command line composes, and `run_cli` (a cl_bench process forked from a warm server, cli_batch.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
CACHE = Path(os.environ.get("CL_BENCH_CACHE", REPO / ".cache" / "cl_bench"))

# Tests never touch the network, W&B or tokenizer worker threads.
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    WANDB_MODE="disabled",
    TOKENIZERS_PARALLELISM="false",
    CL_BENCH_CACHE=str(CACHE),
)
# Under pytest-xdist (make test) there is one test process per core: each, and each cl_bench process
# it starts, uses one thread (torch's default, all cores in every process, oversubscribes the machine).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CL_BENCH_THREADS="1")
    import torch

    torch.set_num_threads(1)  # in case torch was imported before this module


def compose(overrides: list[str]):
    """The job config exactly as `python -m cl_bench <overrides>` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


_SERVER: list[subprocess.Popen] = []  # the fork server of run_cli, started on first use


def _fork_server() -> subprocess.Popen:
    if not _SERVER or _SERVER[0].poll() is not None:
        import atexit

        server = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "helpers" / "cli_batch.py"), "--serve"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        atexit.register(server.kill)
        _SERVER[:] = [server]
    return _SERVER[0]


def run_cli(
    args: list[str],
    timeout: int = 600,
    env_extra: dict | None = None,
    cwd: Path | None = None,
    module: str = "cl_bench",
) -> subprocess.CompletedProcess:
    """`python -m cl_bench ARGS` (or `python -m MODULE ARGS`, e.g. module="cl_bench.report") in its
    own process, as from a shell (exit code, stdout, stderr, environment). The process is forked from
    a server that imported torch/transformers/Hydra once (tests/helpers/cli_batch.py): the same run,
    ~6 s of imports cheaper."""
    import json

    env = dict(os.environ, **(env_extra or {}))
    server = _fork_server()
    request = {"argv": args, "env": env, "timeout": timeout, "cwd": str(cwd or REPO), "module": module}
    server.stdin.write(json.dumps(request) + "\n")
    server.stdin.flush()
    reply = json.loads(server.stdout.readline())
    return subprocess.CompletedProcess([module, *args], reply["returncode"], reply["stdout"], reply["stderr"])


def run_cli_batch(arg_lists: list[list[str]], timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """`run_cli` for each command line, in order."""
    return [run_cli(args, timeout=timeout) for args in arg_lists]


# Small, fast settings for end-to-end runs of the tiny model.
FAST = [
    "general_eval=none",
    "progress=false",
    "trainer.epochs=2",
    "trainer.max_steps=6",
    "sequence.n_train=48",
    "sequence.n_eval=8",
    "evaluation.max_new_tokens=6",
]

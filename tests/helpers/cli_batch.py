"""A fork server for the tests' `python -m cl_bench` command lines.

A fresh interpreter spends ~4-6 s of CPU importing torch, transformers and Hydra before a test's
run even starts (bad-input cases then fail in well under a second). The server imports them once
and forks a child per command line, so each still gets its own process (exit code, stdout, stderr,
environment, working dir, Hydra's global state, SIGKILL) exactly as from a shell.

Usage: python tests/cli_batch.py --serve: one JSON request a line on stdin ({"argv", "env",
"timeout", "cwd", "module": default "cl_bench"}), one JSON result {"returncode", "stdout", "stderr"} a line on stdout, a fork per
request (tests/conftest.py run_cli).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile


def _child(
    argv: list[str],
    out_fd: int,
    err_fd: int,
    env: dict | None = None,
    timeout: int = 0,
    cwd: str | None = None,
    module: str = "cl_bench",
) -> None:
    os.dup2(out_fd, 1)
    if cwd:
        os.chdir(cwd)
    os.dup2(err_fd, 2)
    if env is not None:  # exactly the environment a fresh process would get, PYTHONPATH included
        os.environ.clear()
        os.environ.update(env)
        sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    if timeout:
        signal.alarm(timeout)  # SIGALRM's default action ends a hung run like subprocess's timeout
    sys.argv = ["cl_bench", *argv]
    code = 0
    try:
        if module == "cl_bench":
            from cl_bench.__main__ import main

            main()
        else:  # `python -m <module>`: its __main__ block (a package's __main__.py), as from a shell
            import runpy

            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception in a shell
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _preimport() -> None:
    """What every case needs, imported once before forking."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo
    import hydra  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import cl_bench.__main__  # noqa: F401
    import cl_bench.run.runner  # noqa: F401


def run_forked(
    argv: list[str], env: dict | None = None, timeout: int = 0, cwd: str | None = None, module: str = "cl_bench"
) -> dict:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            _child(argv, out.fileno(), err.fileno(), env, timeout, cwd, module)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {
            "returncode": os.waitstatus_to_exitcode(status),
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
        }


def serve() -> None:
    _preimport()
    replies = os.fdopen(os.dup(1), "w")  # the protocol's channel; fd 1 is each child's own
    for line in sys.stdin:
        request = json.loads(line)
        replies.write(
            json.dumps(
                run_forked(
                    request["argv"],
                    request["env"],
                    int(request.get("timeout") or 0),
                    request.get("cwd"),
                    request.get("module") or "cl_bench",
                )
            )
            + "\n"
        )
        replies.flush()


if __name__ == "__main__":
    if sys.argv[1:] != ["--serve"]:
        sys.exit("usage: python tests/cli_batch.py --serve")
    serve()

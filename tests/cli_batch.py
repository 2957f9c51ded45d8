"""Runs many `python -m cl_bench` command lines in one interpreter, one forked child each.

Bad-input cases fail in well under a second once torch, transformers and Hydra are imported; a
fresh interpreter per case spends ~4 s of CPU importing them. The parent imports them once and
forks a child per case, so each case still gets its own process (exit code, stdout, stderr,
environment, Hydra's global state) exactly as from a shell.

Usage: python tests/cli_batch.py IN.json OUT.json, IN a list of argv lists; OUT a list of
{"returncode", "stdout", "stderr"}.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile


def _child(argv: list[str], out_fd: int, err_fd: int) -> None:
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    sys.argv = ["cl_bench", *argv]
    code = 0
    try:
        from cl_bench.__main__ import main

        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception in a shell
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(in_path: str, out_path: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo
    # What every case needs, imported once before forking.
    import hydra  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import cl_bench.__main__  # noqa: F401
    import cl_bench.runner  # noqa: F401

    results = []
    for argv in json.loads(open(in_path).read()):
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            pid = os.fork()
            if pid == 0:
                _child(argv, out.fileno(), err.fileno())
            _, status = os.waitpid(pid, 0)
            out.seek(0)
            err.seek(0)
            results.append({
                "returncode": os.waitstatus_to_exitcode(status),
                "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace"),
            })
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

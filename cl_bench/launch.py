"""`python -m cl_bench.launch [torchrun options] -m cl_bench [overrides]`: torchrun with cl_bench's
exit codes.

torchrun exits 1 whenever its job does not succeed, Ctrl-C included: its agent takes the SIGINT,
forwards it to the ranks (which stop at a safe point, save, print one line and exit 130, the run
resuming later exactly) and then raises. A scheduler or a script cannot tell that from a crash.
This runs torchrun's own launcher (torch.distributed.run, the same options) in this process and
exits 130 / 143 when the job was interrupted (the launcher got SIGINT / SIGTERM, or every rank
that failed exited with 130 / 143), like a one-process `cl_bench`; anything else is torchrun's.
"""

from __future__ import annotations

import signal
import sys

# what a stopped rank exits with: cl_bench's handled signal (128 + n) or the signal itself (-n)
INTERRUPTED = {130: 130, 143: 143, -signal.SIGINT: 130, -signal.SIGTERM: 143}


def interrupted_exit_code(exc: BaseException) -> int | None:
    """130 / 143 when `exc` (what torchrun's launcher raised) means the job was interrupted, else None."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if isinstance(exc, SignalException):
        return 128 + int(exc.sigval)
    if isinstance(exc, ChildFailedError):
        codes = {failure.exitcode for failure in exc.failures.values()}
        if codes and codes <= set(INTERRUPTED):
            return max(INTERRUPTED[c] for c in codes)  # a SIGTERM among them: 143
    return None


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except BaseException as exc:
        code = interrupted_exit_code(exc)
        if code is None:
            raise
        print(
            f"cl_bench.launch: the job was interrupted (exit {code}); rerun the same command to resume", file=sys.stderr
        )
        sys.exit(code)


if __name__ == "__main__":
    main()

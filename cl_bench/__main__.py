"""`cl_bench [overrides]` (or `python -m cl_bench [overrides]`): the Hydra entry point.

User errors (bad config, missing data, unavailable model) print one line and exit 2; Ctrl-C or
SIGTERM print one line and exit 130 / 143 (the run resumes from where it stopped). The traceback
is raised instead only when HYDRA_FULL_ERROR=1.
"""

from __future__ import annotations

import logging
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The three example commands of `--help` (tests run each of them).
EXAMPLES = (
    ("cl_bench", "the demo: tiny model, synthetic sequence, CPU, a few minutes"),
    ("cl_bench initializer=slice initializer.c=0.5 sequence=synthetic_conflict", "one method, one knob"),
    ("cl_bench --multirun initializer=vanilla,slice seed=1,2,3", "a comparison: 2 methods x 3 seeds"),
)
# Flags after which nothing is trained or loaded: no Hub check, no console session.
_NO_RUN_FLAGS = ("--cfg", "-c", "--info", "-i", "-sc", "--shell-completion", "--hydra-help", "--help", "-h")


def _fail(exc: BaseException) -> None:
    section = getattr(exc, "readme_section", None)
    hint = f" (README.md: '{section}')" if section else ""
    world = int(os.environ.get("WORLD_SIZE", 1))
    who = f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""
    print(f"cl_bench: error{who}: {exc}{hint}", file=sys.stderr)
    sys.exit(2)


def app_help() -> str:
    """`--help`: the groups with one line each, their choices, the plain keys and three examples,
    all read from conf/ so the text cannot drift from the configs."""
    import textwrap

    import yaml

    from .run.config import CONF_DIR, GROUP_HELP, config_groups, group_choices

    main_cfg = yaml.safe_load((CONF_DIR / "config.yaml").read_text())
    defaults = {k: v for d in main_cfg.get("defaults", []) if isinstance(d, dict) for k, v in d.items()}
    lines = [
        "cl_bench: continual learning of LLMs with LoRA adapters. A model is trained on a sequence of",
        "tasks, one LoRA stage per task; after each stage every task is evaluated (results matrix, AP/FP/BWT...).",
        "",
        "usage: cl_bench [group=choice ...] [key=value ...] [--multirun]   (same as: python -m cl_bench ...)",
        "",
        "config groups (group=choice; * marks the default):",
    ]
    groups = [g for g in defaults if g in config_groups()] + [g for g in config_groups() if g not in defaults]
    width = max(len(g) for g in groups)
    for group in groups:
        choices = ", ".join(c + ("*" if c == defaults.get(group) else "") for c in group_choices(group))
        lines.append(f"  {group:<{width}}  {GROUP_HELP.get(group, '')}")
        lines += textwrap.wrap(choices, 100, initial_indent=" " * (width + 4), subsequent_indent=" " * (width + 4))
    keys = [k for k in main_cfg if k not in ("defaults", "hydra")]
    lines += ["", f"other keys: {', '.join(keys)} (see `cl_bench --cfg job` for every value)", "", "examples:"]
    lines += [f"  {cmd:<62} # {what}" for cmd, what in EXAMPLES]
    lines += [
        "",
        "more: cl_bench --cfg job (print the composed config), --hydra-help (Hydra's flags),",
        '      eval "$(cl_bench -sc install=bash)" (tab completion of groups and keys),',
        "      python -m cl_bench.data_check data.root=DIR (which sequences your data can run),",
        "      python -m cl_bench.report DIR... (mean ± std over seeds), README.md",
    ]
    return "\n".join(lines)


def _resume_hint(run_dir: str, multirun: bool) -> str:
    argv = sys.argv[1:]
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if any(a.startswith(f"{key}=") for a in argv):
        return "rerun the same command to resume"
    where = os.path.dirname(run_dir) if multirun else run_dir
    return f"rerun the same command with {key}={where} to resume"


def _in_sweep(exc: BaseException, hydra_cfg) -> BaseException:
    """A sweep job whose dir holds another config: Hydra numbers a sweep's jobs by the order of the
    values given, so a rerun that lists them in another order meets job 0 with another job's run.
    Say so, naming the sweep dir, instead of the one-run advice (another hydra.run.dir)."""
    from .infra.errors import ConfigError
    from .run.store import ConfigMismatch

    if not isinstance(exc, ConfigMismatch):
        return exc
    sweep, job = hydra_cfg.sweep.dir, hydra_cfg.job.get("num", "?")
    return ConfigError(
        f"sweep dir {sweep}: job {job} ({exc.run_dir}) holds a run with other values ({exc.changes()}); Hydra "
        "numbers a sweep's jobs by the order of its values, so rerun with the values in the first run's order "
        "to resume that sweep, or use another hydra.sweep.dir"
    )


def _interrupted_line(failure, run_dir: str, multirun: bool, rank: int) -> str:
    """The one line of a Ctrl-C / SIGTERM: where the run stopped and how to resume it."""
    hint = _resume_hint(run_dir, multirun)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # the launcher stops every rank when one fails; its summary names the failed rank
        hint = (
            f"rank {rank} of {world} was stopped (if another rank failed, the launcher's summary "
            f"names it as the root cause); {hint}"
        )
    return f"cl_bench: interrupted during {failure.where}; {hint}"


def _join_launch(argv: list[str]) -> int:
    """Under torchrun / accelerate launch with N > 1 processes: join the process group, share rank
    0's time stamp (the default run dir) and keep ranks > 0 off the console, out of .hydra/ and in
    their own log file. Returns this process's rank."""
    from .infra.distributed import Dist, init_from_env
    from .infra.errors import ConfigError

    if any(a in ("--multirun", "-m") for a in argv):
        raise ConfigError(
            "--multirun cannot run under a multi-process launcher (each job would start on every rank); "
            "launch one job per command, or use hydra/launcher=slurm with hydra.launcher.tasks_per_node"
        )
    init_from_env()
    dist = Dist("ddp")
    os.environ["CL_BENCH_RUN_STAMP"] = dist.broadcast_object(time.strftime("%Y-%m-%d_%H-%M-%S"), "sharing the run dir")
    if dist.rank > 0:
        sys.argv += ["hydra.output_subdir=null", f"hydra.job.name=cl_bench_rank{dist.rank}", "progress=false"]
    return dist.rank


def _quiet_console() -> None:
    """Ranks > 0: errors only on the console (their log file keeps everything)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def main() -> None:
    from .infra.distributed import launched_world_size
    from .infra.errors import CLBenchError
    from .run.config import check_group_overrides

    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        print(app_help())
        return
    rank = 0
    try:
        check_group_overrides(argv)
        if launched_world_size(slurm=any(a in ("distributed=ddp", "distributed=fsdp") for a in argv)) > 1 and not any(
            a.split("=", 1)[0] in _NO_RUN_FLAGS for a in argv
        ):
            rank = _join_launch(argv)
    except CLBenchError as exc:
        _fail(exc)
    offline_line = None
    if not any(a.split("=", 1)[0] in _NO_RUN_FLAGS for a in argv):
        from .data.hub import decide_offline

        offline_line = decide_offline()  # before any Hugging Face library is imported

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .run.config import CONF_DIR

    # An absolute path: a relative one would be resolved against the package when main() is
    # reached through the `cl_bench` console script (module cl_bench.__main__, not __main__).
    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def app(cfg) -> None:
        from .infra import console
        from .infra.interrupt import Interrupted

        hydra_cfg = HydraConfig.get()
        run_dir = hydra_cfg.runtime.output_dir
        log = logging.getLogger("cl_bench")
        failure: BaseException | None = None
        if rank > 0:
            _quiet_console()
        with console.session(bool(cfg.get("verbose", False))) as stream:
            if offline_line is not None:
                offline, line = offline_line
                # Said on the console only when detected; a user-set HF_HUB_OFFLINE goes to the log.
                log.info(line, extra={} if offline and "not reachable" in line else console.FILE_ONLY)
            log.info(f"run dir {run_dir}")
            try:
                from .run.runner import run
                from .run.summary import format_summary

                results = run(cfg, run_dir, stream=stream)
                log.info(format_summary(results, run_dir), extra=console.FILE_ONLY)  # the log keeps it too
            except (CLBenchError, Interrupted) as exc:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                failure = exc
            multirun = hydra_cfg.mode == RunMode.MULTIRUN
            if isinstance(failure, Interrupted):
                line = _interrupted_line(failure, run_dir, multirun, rank)
                log.warning(line, extra=console.FILE_ONLY)  # the run's log keeps the line too
            elif failure is not None:
                failure = _in_sweep(failure, hydra_cfg) if multirun else failure
                log.error(f"cl_bench: error: {failure}", extra=console.FILE_ONLY)
        if isinstance(failure, Interrupted):
            print(line, file=sys.stderr)
            sys.exit(failure.exit_code)
        if failure is not None:
            _fail(failure)

    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C before the run installed its own handler (imports, composition)
        print("cl_bench: interrupted during startup (before the first stage)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

"""`python -m cl_bench.data_check data.root=DIR`: which sequences the data under DIR can run.

For every sequence YAML in conf/sequence, each task is looked up where its family's loader looks
(file names only: nothing is parsed, nothing is fetched from the Hub), and every general_eval
YAML's benchmarks are checked the same way. Exit status 0 when the root exists, 2 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from .infra.errors import CLBenchError
from .run.config import CONF_DIR


def _superni(name: str, base: Path) -> Path | None:
    from .data.tasks import superni

    task = superni.resolve_task_name(name)
    return next((train for train, _ in superni.candidate_files(task, base) if train.is_file()), None)


def _folder_family(module_name: str) -> Callable[[str, Path], Path | None]:
    def locate(name: str, base: Path) -> Path | None:
        import importlib

        module = importlib.import_module(f"cl_bench.data.tasks.{module_name}")
        task = module.resolve_task_name(name)
        return next((d for d in module.candidate_dirs(task, base) if (d / "train.json").is_file()), None)

    return locate


def _synthetic(name: str, base: Path) -> Path | None:
    from .data.tasks.synthetic import FAMILY_SPECS

    return Path("(generated)") if name in FAMILY_SPECS else None


# family -> where its loader would find a task below data.root (None = not there). Tests check
# that every family of cl_bench.data.tasks.FAMILIES has an entry.
LOCATORS: dict[str, Callable[[str, Path], Path | None]] = {
    "synthetic": _synthetic,
    "superni": _superni,
    "trace": _folder_family("trace"),
    "cl_benchmark": _folder_family("cl_benchmark"),
}

LAYOUT_HINT = {
    "superni": "superni/<task>.json",
    "trace": "trace/<Task>/train.json",
    "cl_benchmark": "cl_benchmark/<Task>/train.json",
    "synthetic": "(generated)",
}


@dataclass
class SequenceStatus:
    name: str
    family: str
    present: list[str]
    missing: list[str]  # "task (reason)" for tasks that cannot be located

    @property
    def runnable(self) -> bool:
        return not self.missing


def check_sequence(path: Path, root: Path) -> SequenceStatus:
    seq = yaml.safe_load(path.read_text())
    family, locate = seq["family"], LOCATORS[seq["family"]]
    present, missing = [], []
    for task in map(str, seq["tasks"]):
        try:
            found = locate(task, root)
        except CLBenchError as exc:  # unknown task name, ambiguous archive variants
            missing.append(f"{task} ({exc})")
            continue
        (present if found is not None else missing).append(task)
    return SequenceStatus(str(seq.get("name", path.stem)), family, present, missing)


def check_general(path: Path, root: Path) -> list[tuple[str, str]]:
    """(benchmark, where its data comes from or what is missing) for one general_eval YAML."""
    from .evaluation import general as general_eval

    cfg = general_eval.parse_config(yaml.safe_load(path.read_text()))
    out = []
    for bench in cfg.benchmarks:
        try:
            source = general_eval.resolve_sources(replace(cfg, benchmarks=(bench,)), str(root))[bench.name]
        except CLBenchError as exc:
            out.append((bench.name, f"MISSING: {exc}"))
            continue
        if source == "registry":
            spec = general_eval.BENCHMARKS[bench.name]
            source = f"not under general/ (wants general/{spec.local_file}); lm-eval registry, needs the Hub"
        out.append((bench.name, source.replace("local:", "local ")))
    return out


def report(root: Path, conf_dir: Path = CONF_DIR) -> tuple[str, list[SequenceStatus]]:
    statuses = [check_sequence(p, root) for p in sorted((conf_dir / "sequence").glob("*.yaml"))]
    general = {p.stem: check_general(p, root) for p in sorted((conf_dir / "general_eval").glob("*.yaml"))}
    width = max([len(s.name) for s in statuses] + [len(name) for checks in general.values() for name, _ in checks])
    lines = [f"data.root = {root}", "", "sequences:"]
    for s in statuses:
        n = len(s.present) + len(s.missing)
        state = "runnable" if s.runnable else f"missing {', '.join(s.missing)}"
        lines.append(f"  {s.name:<{width}}  {s.family:<12} {len(s.present):>2}/{n:<2} {state}")
    for name, checks in general.items():
        if checks:
            lines.append(f"general_eval={name}:")
            lines.extend(f"  {name:<{width}}  {where}" for name, where in checks)
    runnable = [s.name for s in statuses if s.runnable]
    lines += [
        "",
        f"runnable ({len(runnable)}/{len(statuses)}): {', '.join(runnable) or 'none'}",
        "expected layout: "
        + ", ".join(f"{f}: {h}" for f, h in LAYOUT_HINT.items() if f != "synthetic")
        + " (README.md: 'Getting the data')",
    ]
    return "\n".join(lines), statuses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cl_bench.data_check", description=__doc__.splitlines()[0])
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="data.root=DIR",
        help="the data folder (default: env CL_BENCH_DATA), as in a run's overrides",
    )
    args = parser.parse_args(argv)
    root = os.environ.get("CL_BENCH_DATA")
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key != "data.root" or not value:
            print(f"cl_bench.data_check: error: unknown argument {item!r}; give data.root=DIR", file=sys.stderr)
            return 2
        root = value
    if not root or not Path(root).expanduser().is_dir():
        print(
            f"cl_bench.data_check: error: data.root={root!r} is not a directory (README.md: 'Getting the data')",
            file=sys.stderr,
        )
        return 2
    text, _ = report(Path(root).expanduser())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

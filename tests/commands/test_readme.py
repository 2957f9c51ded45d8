"""Every command the README shows (and the examples of `cl_bench --help`) runs, so neither can
drift from the code. Runs are checked by composing their config (`--cfg job --resolve`, which
fails on an unknown group, choice or key exactly as the real run would) rather than training;
report and data_check commands run for real on small stand-in folders."""

from __future__ import annotations

import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from helpers import REPO

README = (REPO / "README.md").read_text()
RUN_PREFIXES = (
    [".venv/bin/python", "-m", "cl_bench"],
    ["python", "-m", "cl_bench"],
    [".venv/bin/cl_bench"],
    ["cl_bench"],
)
LAUNCHERS = {".venv/bin/torchrun", ".venv/bin/accelerate", "srun"}  # multi-process launchers of the same job
EXTERNAL = {"hf"}  # tools of the pinned dependencies that the README uses; checked to be installed


def readme_commands() -> list[str]:
    """Lines of every fenced block except ```text ones (layouts, sample output), comments cut."""
    commands = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", README, re.S):
        if lang == "text":
            continue
        body = re.sub(r"\\\n\s*", "", body)  # a shell line continued with a backslash is one command
        for line in body.splitlines():
            line = re.split(r"\s+#\s", line)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def help_examples() -> list[str]:
    from cl_bench.__main__ import EXAMPLES

    return [cmd for cmd, _ in EXAMPLES]


def _split_sweeps(args: list[str]) -> list[list[str]]:
    """A multirun's overrides as single runs: every value of every swept key appears once."""
    sweeps = {
        i: a.split("=", 1)[1].split(",")
        for i, a in enumerate(args)
        if "=" in a and not a.startswith(("-", "hydra")) and "," in a and "[" not in a
    }
    if not sweeps:
        return [args]
    runs = []
    for i, values in sweeps.items():
        for v in values:
            run = [a.split("=", 1)[0] + "=" + sweeps[j][0] if j in sweeps else a for j, a in enumerate(args)]
            run[i] = args[i].split("=", 1)[0] + "=" + v
            runs.append(run)
    return runs


def run_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from cl_bench.__main__ import main

    monkeypatch.setattr(sys, "argv", [str(REPO / ".venv" / "bin" / "cl_bench"), *argv])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def check_cl_bench(args: list[str], monkeypatch, capsys) -> None:
    if "--help" in args or "-h" in args:
        code, out = run_main(args, monkeypatch, capsys)
        assert code == 0 and "config groups" in out
        return
    if "-sc" in args:
        code, out = run_main(args, monkeypatch, capsys)
        assert code == 0 and "complete -o nospace" in out and "cl_bench" in out
        return
    args = [a for a in args if a not in ("--multirun", "-m")]
    if "--config-name" in args:  # a sweep defined in a YAML: its swept values must be valid too
        from cl_bench.run.config import check_group_overrides

        name = args[args.index("--config-name") + 1]
        params = yaml.safe_load((REPO / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
        check_group_overrides(["--multirun", *(f"{k}={v}" for k, v in params.items())])
    for run in _split_sweeps(args):
        code, out = run_main([*run, "--cfg", "job", "--resolve"], monkeypatch, capsys)
        assert code == 0, f"{run}: {out[-2000:]}"
        assert "initializer:" in out and "sequence:" in out


def fake_results(path, seed: int) -> None:
    path.mkdir(parents=True)
    (path / "results.json").write_text(
        json.dumps(
            {
                "sequence": "synthetic",
                "metrics": {"AP": 50.0 + seed},
                "complete": True,
                "config": {"initializer": {"_target_": "x.Vanilla"}, "seed": seed},
            }
        )
    )


def check_module(module: str, args: list[str], tmp_path, capsys) -> None:
    if module == "cl_bench.report":
        from cl_bench.report.cli import main

        valued = {
            "--out",
            "--markdown",
            "--baseline",
            "--format",
            "--metrics",
            "--title",
            "--notes",
            "--plots",
        }  # options taking a value
        kinds = [
            "option" if a.startswith("-") else (args[i - 1] if i and args[i - 1] in valued else "path")
            for i, a in enumerate(args)
        ]
        args = [
            str(tmp_path / a) if k in ("path", "--out", "--markdown", "--notes") else a for a, k in zip(args, kinds)
        ]
        for path in [a for a, k in zip(args, kinds) if k == "path"]:
            for seed in (1, 2):
                fake_results(tmp_path / path / str(seed), seed)
        if "--notes" in kinds:
            Path(args[kinds.index("--notes")]).write_text("notes")
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "Vanilla" in out and "51.50 ± 0.71" in out
        if "--out" in args:
            assert (tmp_path / args[args.index("--out") + 1] / "summary.csv").exists()
        if "--markdown" in args:
            assert "51.50 ± 0.71" in Path(args[args.index("--markdown") + 1]).read_text()
    elif module == "cl_bench.data_check":
        from cl_bench.data_check import main

        assert all(a.startswith("data.root=") for a in args)
        (tmp_path / "data").mkdir()
        assert main([f"data.root={tmp_path / 'data'}"]) == 0
        assert "runnable (" in capsys.readouterr().out
    elif module == "cl_bench.remerge":
        from cl_bench.remerge import parse_overrides

        assert args[0] == "RUN_DIR"  # a placeholder: parse the overrides as the tool does
        assert parse_overrides(args[1:])[0] in args[1]
    else:
        pytest.fail(f"README runs module {module}, which this test does not know")


def check_command(line: str, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)  # README commands run from the repository root
    eval_form = re.fullmatch(r'eval "\$\((.*)\)"', line)
    tokens = shlex.split(eval_form.group(1) if eval_form else line)
    if tokens[0] == "make":
        makefile = (REPO / "Makefile").read_text()
        assert re.search(rf"^{tokens[1]}:", makefile, re.M), f"no make target {tokens[1]}"
        recipe = re.search(rf"^{tokens[1]}:.*\n\t(.*)", makefile, re.M).group(1)
        if re.search(r"-m cl_bench\s", recipe):  # a run (not -m cl_bench.report etc.)
            check_cl_bench(shlex.split(recipe.split("-m cl_bench", 1)[1]), monkeypatch, capsys)
        return
    if tokens[0] == "source":  # activating the venv the Makefile made
        assert tokens[1] == ".venv/bin/activate" and (Path(sys.executable).parent / "activate").exists()
        return
    if tokens[0] in EXTERNAL:
        assert (Path(sys.executable).parent / tokens[0]).exists(), (
            f"{tokens[0]} is not installed next to {sys.executable}"
        )
        return
    if tokens[0] in LAUNCHERS:  # torchrun / accelerate launch / srun ... -m cl_bench <overrides>
        if tokens[0].startswith(".venv/bin/"):
            assert (Path(sys.executable).parent / tokens[0].rsplit("/", 1)[1]).exists(), f"{tokens[0]} is not installed"
        at = next(i for i in range(len(tokens) - 1) if tokens[i : i + 2] == ["-m", "cl_bench"])
        return check_cl_bench(tokens[at + 2 :], monkeypatch, capsys)
    for prefix in RUN_PREFIXES:
        if tokens[: len(prefix)] == prefix:
            return check_cl_bench(tokens[len(prefix) :], monkeypatch, capsys)
    if tokens[:2] in ([".venv/bin/python", "-m"], ["python", "-m"]):
        return check_module(tokens[2], tokens[3:], tmp_path, capsys)
    pytest.fail(f"README command not covered by this test: {line}")


@pytest.mark.parametrize("line", readme_commands() + help_examples())
def test_readme_and_help_commands_run(line, tmp_path, monkeypatch, capsys):
    check_command(line, tmp_path, monkeypatch, capsys)


def test_readme_shows_the_walkthrough_and_data_sections():
    for section in (
        "## Your first comparison",
        "## Getting the data",
        "## Getting a model",
        "## Which model for which benchmark",
    ):
        assert section in README
    commands = readme_commands()
    assert any("cl_bench.report" in c for c in commands) and any("cl_bench.data_check" in c for c in commands)
    assert any("--multirun" in c and "seed=1,2,3" in c for c in commands)
    # The README sections that error messages point at exist.
    from cl_bench.infra.errors import DataError, ModelLoadError
    from cl_bench.run.summary import MODEL_SIZES_SECTION

    for section in (DataError.readme_section, ModelLoadError.readme_section, MODEL_SIZES_SECTION):
        assert f"## {section}" in README


def test_console_script_entry_and_help_text(monkeypatch, capsys):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["cl_bench"].split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))
    code, out = run_main(["--help"], monkeypatch, capsys)
    from cl_bench.run.config import GROUP_HELP, config_groups

    assert code == 0 and set(GROUP_HELP) == set(config_groups())
    for group in config_groups():
        assert re.search(rf"^  {group}\s+{re.escape(GROUP_HELP[group])}$", out, re.M), group
    assert "slice" in out and "vanilla*" in out  # choices, default marked
    monkeypatch.setenv("COMP_LINE", "cl_bench initializer=sl")
    code, out = run_main(["-sc", "query=bash"], monkeypatch, capsys)
    assert code == 0 and out.split() == ["initializer=slice"]

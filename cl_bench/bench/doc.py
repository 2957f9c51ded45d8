"""`python -m cl_bench.bench.doc bench.json --out docs/performance.md`: the performance note, generated
from one bench.json (never typed): the machine and its load, the targets (measured, pass/miss), the
real model's phases next to their references, the whole runs, and one plot (cl_bench's speed-ups
over each reference, with the targets). `--notes FILE` appends a hand-written analysis (what
limits each missed target) under its own heading, marked as such.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (phase, key) of a reference row -> (phase, key) of the cl_bench row it is compared with: the
# speed-ups the plot shows, with the target each is held to (None: shown, not a target).
SPEEDUPS = [
    ("whole run, vanilla", ("whole run", "authors:vanilla"), ("whole run", "ours:vanilla:"), 2.0),
    ("whole run, LoRA-GA", ("whole run", "authors:lora_ga"), ("whole run", "ours:lora_ga:"), 2.0),
    ("whole run, SLICE", ("whole run", "authors:slice"), ("whole run", "ours:slice:"), 2.0),
    ("train vs HF Trainer+PEFT", ("train", "hf_trainer"), ("train", "group"), 1.0),
    ("train vs authors' loop", ("train", "reference"), ("train", "group"), None),
    ("eval vs authors' batch 8", ("eval", "authors"), ("eval", "ours"), 3.0),
    ("eval vs plain HF generate", ("eval", "hf_generate"), ("eval", "ours"), None),
    ("eval vs lm-eval generate_until", ("eval", "lm_eval"), ("eval", "ours"), None),
]


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "pass" if v else "**miss**"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v).replace("|", "/")


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> list[str]:
    out = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(k)) for _, k in cols) + " |" for r in rows]
    return out


def _pick(rows: list[dict], model: str, phase: str, key: str) -> dict | None:
    """The row of `model`/`phase` whose key is `key` (a key ending in ':' matches its first row)."""
    for r in rows:
        k = str(r.get("key", ""))
        if r["model"] == model and r["phase"] == phase and (k == key or (key.endswith(":") and k.startswith(key))):
            return r
    return None


def speedups(rows: list[dict], model: str) -> list[dict]:
    """cl_bench's speed-up over each reference of SPEEDUPS present in `rows` (rate = 1/seconds,
    or examples/s and tokens/s where the two did different amounts of work)."""
    out = []
    for label, (rp, rk), (op, ok), goal in SPEEDUPS:
        ref, ours = _pick(rows, model, rp, rk), _pick(rows, model, op, ok)
        if ref is None or ours is None:
            continue
        rate = "tokens_per_s" if rp == "train" else "examples_per_s" if rp == "eval" else None
        ratio = ours[rate] / ref[rate] if rate else ref["seconds"] / ours["seconds"]
        out.append({"label": label, "ratio": ratio, "goal": goal})
    return out


def plot(rows: list[dict], model: str, path: Path) -> bool:
    """The speed-ups of `model` as horizontal bars with each target's mark; False without any."""
    data = speedups(rows, model)
    if not data:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(data) + 1.2))
    y = list(range(len(data)))[::-1]
    colors = ["#4c72b0" if d["goal"] is None or d["ratio"] >= d["goal"] else "#dd8452" for d in data]
    ax.barh(y, [d["ratio"] for d in data], color=colors)
    for yi, d in zip(y, data):
        ax.text(d["ratio"], yi, f" {d['ratio']:.2f}x", va="center", fontsize=8)
        if d["goal"] is not None:
            ax.plot([d["goal"], d["goal"]], [yi - 0.4, yi + 0.4], color="black", linewidth=1.5)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_yticks(y, [d["label"] for d in data], fontsize=8)
    ax.set_xlabel("cl_bench speed-up over the reference (x); black marks: the targets")
    ax.set_title(f"{model}: cl_bench against the references, one bench run", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _machine(report: dict) -> list[str]:
    m = report["machine"]
    load = lambda v: " ".join(f"{x:.2f}" for x in v) if v else "–"  # noqa: E731
    extra = [
        f"- measured beside it: {x['file']} ({x['threads']} thread(s), load average {load(x['load_average_start'])}"
        f" at its start, {load(x['load_average_end'])} at its end)"
        for x in m.get("merged", [])
    ]
    return extra + [
        f"- device: {m['device']}, torch {m['torch']}, {m['threads']} CPU thread(s) ({m['threads_source']})",
        f"- load average (1, 5, 15 min) at the start {load(m['load_average_start'])}, at the end {load(m['load_average_end'])}",
        f"- seconds: {'process CPU seconds (one thread: what other load does not inflate)' if m['seconds_basis'] == 'cpu' else 'wall seconds'}; the bench took {m['seconds'] / 60:.0f} min",
        f"- data: {report['data']}",
        *([f"- command: `{report['command']}`"] if report.get("command") else []),
    ]


def _runs(rows: list[dict], model: str) -> list[str]:
    runs = [r for r in rows if r["model"] == model and r["phase"] == "whole run"]
    if not runs:
        return []
    view = [
        {
            "variant": r["variant"],
            "seconds": r["seconds"],
            "wall_s": r.get("wall_s"),
            "parts": ", ".join(f"{k} {v:.0f}" for k, v in (r.get("parts") or {}).items() if v >= 0.5),
        }
        for r in runs
    ]
    cols = [("run", "variant"), ("seconds", "seconds"), ("wall s", "wall_s"), ("where the seconds go", "parts")]
    return ["", f"### {model}: whole runs", "", *_table(view, cols)]


def render(report: dict, image: str | None, notes: str | None) -> str:
    """The Markdown note of one bench.json (`image`: the plot's path relative to the note)."""
    rows = report["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [
        "# Performance (generated by `make bench`: `python -m cl_bench.bench`, then `python -m cl_bench.bench.doc`)",
        "",
        "Every number below comes from one run of the bench (bench.json); ratios are taken within that run,",
        "side by side. Do not edit this file: rerun `make bench`.",
        "",
        "## Machine",
        "",
        *_machine(report),
        "",
        "## Targets",
        "",
        *_table(
            report["targets"],
            [
                ("model", "model"),
                ("target", "target"),
                ("goal", "goal"),
                ("measured", "measured"),
                ("result", "ok"),
                ("note", "note"),
            ],
        ),
    ]
    if image:
        lines += ["", f"![cl_bench against the references]({image})"]
    cols = [
        ("phase", "phase"),
        ("variant", "variant"),
        ("seconds", "seconds"),
        ("tokens/s", "tokens_per_s"),
        ("examples/s", "examples_per_s"),
        ("GFLOP/s", "gflops"),
        ("peak MB", "peak_mb"),
    ]
    for model in models:
        mine = [r for r in rows if r["model"] == model and r["phase"] not in ("whole run", "exactness")]
        lines += ["", f"## {model}", "", *_table(mine, cols), *_runs(rows, model)]
    if report.get("notes"):
        lines += ["", "## Notes of the run", "", *(f"- {note}" for note in report["notes"])]
    if notes:
        lines += ["", "## Analysis (hand-written, from the numbers above)", "", notes.strip()]
    return "\n".join(lines) + "\n"


def merge(report: dict, extra: dict, name: str) -> dict:
    """`report` with the rows and notes of `extra` (another bench.json of the same machine, e.g.
    `--phases preset` run beside it) and its targets added (each target's ratio is taken within one
    of the two runs); the extra run's machine line (its load included) is kept under machine.merged."""
    rows = report["rows"] + extra["rows"]
    m = extra["machine"]
    merged = dict(file=name, **{k: m.get(k) for k in ("threads", "load_average_start", "load_average_end", "seconds")})
    machine = {**report["machine"], "merged": [*report["machine"].get("merged", []), merged]}
    notes, goals = report["notes"] + extra["notes"], report["targets"] + extra["targets"]
    return {**report, "machine": machine, "rows": rows, "notes": list(dict.fromkeys(notes)), "targets": goals}


def local_paths(text: str, report: dict) -> str:
    """`text` with this machine's data folder written as DATA (the note is read on other machines):
    the report's data_root, else the folder named in its data line ("... samples (PATH)")."""
    import re

    root = report.get("data_root") or (re.findall(r"\((/[^()]+)\)", report.get("data") or "") or [None])[0]
    return text.replace(root, "DATA") if root else text


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m cl_bench.bench.doc", description=__doc__)
    parser.add_argument("bench_json", nargs="?", default="bench.json")
    parser.add_argument("--out", default="docs/performance.md")
    parser.add_argument("--model", default="smollm2", help="whose speed-ups the plot shows")
    parser.add_argument("--notes", default=None, help="a Markdown file appended as the hand-written analysis")
    parser.add_argument(
        "--add", nargs="*", default=[], help="bench.json files measured beside it: rows merged in, bench_json rewritten"
    )
    args = parser.parse_args(argv)
    report = json.loads(Path(args.bench_json).read_text())
    for extra in args.add:
        report = merge(report, json.loads(Path(extra).read_text()), Path(extra).name)
    if args.add:
        Path(args.bench_json).write_text(json.dumps(report, indent=2, default=str))
    out = Path(args.out)
    image = out.with_suffix(".png")
    has_plot = plot(report["rows"], args.model, image)
    notes = Path(args.notes).read_text() if args.notes and Path(args.notes).is_file() else None
    out.write_text(local_paths(render(report, image.name if has_plot else None, notes), report))
    print(f"written: {out}" + (f", {image}" if has_plot else ""))
    return out


if __name__ == "__main__":
    main()

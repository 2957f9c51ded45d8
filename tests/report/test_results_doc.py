"""docs/results.md as the report command writes it: regenerated from small hand-written
results.json files, its numbers checked against those inputs; the reference modes sit beside the
methods; the reading section is computed (verdicts, p-values, projection) and the notes file is kept."""

from __future__ import annotations

import json
import re
from statistics import fmean, stdev

import pytest

from cl_bench.report.cli import main
from cl_bench.report.stats import fmt_p, paired_test

TASKS = ["a", "b"]
SEEDS = [1, 2, 3]
# FP, Fgt per seed; AP = FP + Fgt. SLICE: FP higher by 5, 6, 7 (a clear gain); LoRA-GA: ±, noise.
FP = {"vanilla": [40.0, 44.0, 42.0], "slice": [45.0, 50.0, 49.0], "lora_ga": [41.0, 43.0, 43.0]}
FGT = {"vanilla": [30.0, 28.0, 32.0], "slice": [25.0, 22.0, 26.0], "lora_ga": [29.0, 30.0, 30.0]}
TARGETS = {"vanilla": "x.Vanilla", "slice": "x.Slice", "lora_ga": "x.LoraGA"}


def write(path, seed, method, mode="sequential"):
    cfg = {
        "initializer": {"_target_": TARGETS[method]},
        "trainer": {"lr": 0.001},
        "mode": mode,
        "sequence": {"name": "conflict", "tasks": TASKS},
        "seed": seed,
    }
    i = SEEDS.index(seed)
    if mode == "independent":  # every task from the base model: R[2,2] = 60 + seed is task 2's from-scratch score
        matrix = [[0.0, 0.0], [50.0, 5.0], [3.0, 60.0 + seed]]
        metrics = {"AP": fmean([50.0, 60.0 + seed]), "FP": fmean([50.0, 60.0 + seed]), "Fgt": 0.0}
        stages = [
            {"stage": 1, "task": "a", "init": {"method": "vanilla"}},
            {"stage": 2, "task": "b", "init": {"method": "vanilla"}},
        ]
    elif mode == "multitask":
        matrix = [[0.0, 0.0], [90.0 + seed, 80.0]]
        metrics = {"AP": 85.0 + seed / 2, "FP": 85.0 + seed / 2, "Fgt": 0.0}
        stages = [{"stage": 1, "task": "multitask", "tasks": TASKS, "init": {"method": "vanilla"}}]
    else:
        fp, fgt = FP[method][i], FGT[method][i]
        matrix = [[0.0, 0.0], [fp + fgt, 10.0], [fp - fgt, fp + fgt]]  # mean diag = AP, mean last row = FP
        metrics = {"AP": fp + fgt, "FP": fp, "Fgt": fgt}
        init = {"method": method}
        if method == "slice":  # fired at stage 2 in seeds 1 and 2 only
            init = {
                "method": "slice",
                "projection": "fired" if seed < 3 else "not fired",
                "fired": seed < 3,
                "cos_global": -0.2 if seed < 3 else 0.1,
                "gamma": 0.5 if seed < 3 else 0.0,
            }
        stages = [{"stage": 1, "task": "a", "init": {"method": method}}, {"stage": 2, "task": "b", "init": init}]
    path.mkdir(parents=True)
    (path / "results.json").write_text(
        json.dumps(
            {
                "sequence": "conflict",
                "tasks": TASKS,
                "mode": mode,
                "matrix": matrix,
                "metrics": metrics,
                "stages": stages,
                "complete": True,
                "status": "complete",
                "config": cfg,
            }
        )
    )


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    root = tmp_path_factory.mktemp("claim")
    k = 0
    for method in ("vanilla", "slice", "lora_ga"):
        for seed in SEEDS:
            write(root / "runs" / str(k), seed, method)
            k += 1
    for seed in SEEDS:
        for mode in ("multitask", "independent"):
            write(root / "runs" / str(k), seed, "vanilla", mode=mode)
            k += 1
    notes = root / "notes.md"
    notes.write_text("Human text: the benchmark as of this sweep.\n")
    doc = root / "docs" / "results.md"
    assert (
        main(
            [
                str(root / "runs"),
                "--baseline",
                "vanilla",
                "--out",
                str(root / "docs" / "results"),
                "--markdown",
                str(doc),
                "--notes",
                str(notes),
                "--plots",
                "summary",
                "--format",
                "csv,md",
                "--metrics",
                "AP,FP,Fgt",
            ]
        )
        == 0
    )
    return doc.read_text(), root


def test_the_document_holds_the_inputs_numbers(document):
    text, root = document
    assert "Human text: the benchmark as of this sweep." in text
    v_fp = f"{fmean(FP['vanilla']):.2f} ± {stdev(FP['vanilla']):.2f}"
    assert re.search(r"\|\s*Vanilla\s*\|[^\n]*" + re.escape(v_fp), text), text  # baseline absolute
    d_fp = fmean(FP["slice"]) - fmean(FP["vanilla"])
    assert f"+{d_fp:.2f} ± {stdev(FP['slice']):.2f}" in text  # Δ row ± the method's std
    # the multitask row sits beside the methods, in the same block, as Δ vs vanilla
    mt_fp = fmean(85.0 + s / 2 for s in SEEDS) - fmean(FP["vanilla"])
    assert re.search(r"\|\s*Multitask\s*\|[^\n]*" + re.escape(f"+{mt_fp:.2f}"), text), text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    names = {link.rsplit("/", 1)[-1] for link in links}
    assert {"AP-vs-FP__conflict.png", "R-mean__conflict__Multitask.png", "R-mean__conflict__Slice.png"} <= names
    assert all((root / "docs" / link).exists() for link in links)


def test_the_reading_is_computed_from_the_runs(document):
    text, _ = document
    reading = text.split("## Reading (computed from the runs)", 1)[1].split("\n## ", 1)[0]
    test = paired_test(FP["slice"], FP["vanilla"])
    slice_line = next(line for line in reading.splitlines() if line.startswith("- Slice"))
    d_fp = fmean(FP["slice"]) - fmean(FP["vanilla"])
    noise = stdev(FP["vanilla"])
    assert (
        f"ΔFP +{d_fp:.2f} ± {stdev(FP['slice']):.2f} (p {fmt_p(test.p_t)} [{fmt_p(test.p_signflip)}], {d_fp / noise:.1f}× noise; better)"
        in slice_line
    )
    assert test.p_t < 0.05 and "**helps**" in slice_line
    fgt = paired_test(FGT["slice"], FGT["vanilla"])
    assert (
        f"(p {fmt_p(fgt.p_t)} [" in slice_line
        and ("better" if fgt.p_t < 0.05 else "within seed noise") in slice_line.split("ΔFgt")[1]
    )
    lora_ga = next(line for line in reading.splitlines() if line.startswith("- LoraGA"))
    assert paired_test(FP["lora_ga"], FP["vanilla"]).p_t >= 0.05 and "**no difference beyond seed noise**" in lora_ga
    # the projection of each stage: fired in 2 of 3 seeds, cos mean ± std of (-0.2, -0.2, 0.1)
    proj = reading.split("- Slice", 1)[1].splitlines()[1]
    assert (
        "stage 2 (b): fired 2/3 seeds" in proj
        and f"cos {fmean([-0.2, -0.2, 0.1]):+.3f} ± {stdev([-0.2, -0.2, 0.1]):.3f}" in proj
    )
    # the upper bound is read as a reference point, not as a method that "helps"
    assert "- Multitask (n=3): **reference, the joint-training upper bound**" in reading


def test_fwt_against_the_independent_runs_is_paired_by_seed(document):
    import pandas as pd

    _, root = document
    summary = pd.read_csv(root / "docs" / "results" / "summary.csv").set_index("method")
    # PS-LoRA's FWT with T = 2: R[2,2] of the sequential run minus R[2,2] of the independent run, same seed
    expected = fmean(FP["vanilla"][i] + FGT["vanilla"][i] - (60.0 + s) for i, s in enumerate(SEEDS))
    assert summary.loc["Vanilla", "FWT_scratch"] == pytest.approx(expected)
    assert summary.loc["Independent", "role"] == "delta" and pd.isna(summary.loc["Independent", "FWT_scratch"])
    assert pd.isna(summary.loc["Multitask", "FWT_scratch"])

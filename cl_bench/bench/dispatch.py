"""Runs a named bench phase of one model spec (`python -m cl_bench.bench --phases ...`): each
measurement in its own process (recipes.isolated); rows go to b.rows."""

from __future__ import annotations

from .phases import phase_csweep, phase_exact, phase_gpip, phase_init, phase_merge, phase_train
from .recipes import isolated
from .setup import Bench, ModelSpec


def run_phase(b: Bench, spec: ModelSpec, phase: str) -> None:
    """Run `phase` (one of ModelSpec.phases) of `spec`, each measurement isolated; rows go to b.rows."""
    if phase == "init":
        for stage in spec.stages:
            b.rows += isolated(b, lambda stage=stage: phase_init(b, spec, stage))
        if spec.capture_max_tokens:  # the last stage again, capture forward passes the size of training's
            b.rows += isolated(b, lambda: phase_init(b, spec, spec.stages[-1], spec.capture_max_tokens))
    elif phase == "csweep":
        b.rows += isolated(b, lambda: phase_csweep(b, spec))
    elif phase == "train":
        variants = list(spec.train_variants) + (["group+compile"] if b.compile else [])
        b.rows += isolated(b, lambda: phase_train(b, spec, variants))
        if b.device.type == "cuda":
            b.rows += isolated(b, lambda: phase_train(b, spec, ["group"], fixed_len=True))
    elif phase == "merge":
        b.rows += isolated(b, lambda: phase_merge(b, spec))
    elif phase == "eval":
        from .evals import phase_eval

        b.rows += isolated(b, lambda: phase_eval(b, spec))
    elif phase == "gpip":
        b.rows += isolated(b, lambda: phase_gpip(b, spec))
    elif phase == "exact":
        b.rows += isolated(b, lambda: phase_exact(b, spec))
    elif phase == "load":
        from .real import phase_load

        b.rows += isolated(b, lambda: phase_load(b, spec))
    elif phase == "bf16":
        from .real import phase_bf16

        b.rows += isolated(b, lambda: phase_bf16(b, spec))
    elif phase == "runs":
        from .runs import phase_runs

        b.rows += phase_runs(b, spec)  # each run in its own child
    elif phase == "preset":
        from .runs import phase_preset

        b.rows += phase_preset(b, spec)  # its own process

"""`python -m cl_bench.remerge RUN_DIR merge=<choice> [merge.<key>=<value> ...]`: another merge
of a run's trained task vectors, without retraining.

For every finished stage t of the run in RUN_DIR it rebuilds the eval model W0 + X(τ_1..τ_t) of
the chosen merge X (Merge.eval_delta) from W0 (the model as loaded from the run's model config
and cache) and the per-stage task vectors (stages/stage_XX/{adapter,init}.safetensors), and
writes, beside the run's own files:
  results.remerge-<tag>.json                  the results.json contract (matrix, metrics, config
                                              with the new merge, ...) plus a "remerge" block
  predictions.remerge-<tag>/stage_XX/<task>.jsonl
<tag> is the choice followed by the knob overrides (`ties_density=0.5`) unless --name gives one.

What it computes, honestly: a *post-hoc* merge. The τ_i are those the source run trained, each
against the source run's train model. A merge whose train model differs from the source's
(e.g. train_on=merged vs an absorb run) would have trained stages 2..T on other models, so
its τ's — and its real results — would differ; remerge cannot know them. The "remerge" block
says which case holds: `same_training` is true when the new merge's train model equals the
source's after every stage but the last (then the file holds what a run with this merge would
give, up to float rounding of the fold), false when it does not, null when the source merge
cannot say (a test or branch-keeping merge).

Only what changes is evaluated: row t is copied from the source (scores, predictions, GP/IP)
when the source merge's eval model after stage t is bit-identical to the new one (row 0,
before training, always is), and evaluated otherwise, GP/IP included where the source measured
them at that stage.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import OmegaConf

from .infra.errors import CLBenchError, ConfigError
from .run.config import CONF_DIR, check_group_overrides

_OVERRIDE = re.compile(r"^merge(\.[A-Za-z_][A-Za-z0-9_]*)?=")


def parse_overrides(overrides: list[str]) -> tuple[str, list[str]]:
    """(merge choice, knob overrides); only `merge=<choice>` and `merge.<key>=<value>` are accepted."""
    bad = [o for o in overrides if not _OVERRIDE.match(o)]
    if bad:
        raise ConfigError(f"remerge: {bad[0]!r} is not a merge override; valid: merge=<choice> and merge.<key>=<value>")
    choices = [o.split("=", 1)[1] for o in overrides if o.startswith("merge=")]
    if len(choices) != 1:
        raise ConfigError("remerge: give exactly one merge=<choice> (e.g. merge=ties), then any merge.<key>=<value>")
    check_group_overrides([f"merge={choices[0]}"])
    knobs = [o for o in overrides if not o.startswith("merge=")]
    valid = sorted(k for k in OmegaConf.load(CONF_DIR / "merge" / f"{choices[0]}.yaml") if k != "_target_")
    for knob in knobs:
        key = knob.split("=", 1)[0][len("merge.") :]
        if key not in valid:
            raise ConfigError(
                f"remerge: merge.{key} is not a knob of merge={choices[0]}; valid: {', '.join(valid) or 'none'}"
            )
    return choices[0], knobs


def tag_of(choice: str, knobs: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]", "-", "_".join([choice, *(k[len("merge.") :] for k in knobs)]))


def merge_config(choice: str, knobs: list[str], source_config: dict):
    """The merge group composed from conf/ with the overrides, resolved against the source run's
    config (so `seed: ${seed}` is the run's seed)."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = compose(config_name="config", overrides=[f"merge={choice}", *knobs])
    except Exception as exc:  # Hydra's override errors are many lines; the last one names the key
        raise ConfigError(f"remerge: {str(exc).strip().splitlines()[-1]}") from None
    root = OmegaConf.create(source_config)
    root.merge = OmegaConf.to_container(composed.merge, resolve=False)
    return root.merge


def _build(merge_cfg, what: str):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(merge_cfg)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, CLBenchError):
            raise exc.__cause__ from None
        raise ConfigError(f"{what}: cannot build {merge_cfg.get('_target_')!r}: {str(exc).splitlines()[-1]}") from None


def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and torch.equal(a, b)


def _source_results(store) -> dict[str, Any]:
    """The source run's results.json; ConfigError unless it is a sequential run with a finished stage."""
    path = store.results_path
    source = store.read_results()
    if source is None:
        raise ConfigError(f"remerge: {path} not found; give the run dir of a cl_bench run")
    if source.get("mode", "sequential") != "sequential":
        raise ConfigError(
            f"remerge: {path} is a mode={source['mode']} run; only sequential runs have task vectors to merge"
        )
    if not source.get("stages"):
        raise ConfigError(f"remerge: {path} has no finished stage yet")
    return source


def _merges(choice: str, knobs: list[str], source: dict[str, Any]):
    """(new merge config, new merge, source merge or None when it cannot be built here)."""
    new_cfg = merge_config(choice, knobs, source["config"])
    new = _build(new_cfg, "merge")
    try:
        old = _build(OmegaConf.create(source["config"]).merge, "source merge")
    except (CLBenchError, ImportError):
        old = None  # e.g. a test-only plug-in not on the path: every row is evaluated
        print(
            f"remerge: the source merge {source['config']['merge'].get('_target_')!r} cannot be built here; evaluating every row"
        )
    return new_cfg, new, old


def _load_run(cfg, source: dict[str, Any], modules: list[str], dev, path: Path) -> SimpleNamespace:
    """The source run's tasks, model as loaded (W0 of `modules` kept exactly, in its dtype) and
    evaluation settings (the runner's prompt format: the same prompts as the source run)."""
    from .data.models import load_model
    from .data.prompts import prompt_format
    from .data.tasks import load_sequence
    from .lora.layers import target_linears

    tasks = load_sequence(cfg.sequence, cfg.data.get("root"), int(cfg.seed))
    if [t.name for t in tasks] != source["tasks"]:
        raise ConfigError(f"remerge: the sequence config of {path} no longer yields its tasks {source['tasks']}")
    model, tokenizer = load_model(cfg.model, dev, str(cfg.cache.dir))
    linears = target_linears(model, list(cfg.lora.target_modules))
    ev = cfg.evaluation
    max_pos = getattr(model.config, "max_position_embeddings", None) or 10**9
    general_eval = None
    if str(cfg.general_eval.get("when", "none")) != "none":
        from .evaluation import general as general_eval
    return SimpleNamespace(
        cfg=cfg,
        tasks=tasks,
        model=model,
        tokenizer=tokenizer,
        linears=linears,
        dev=dev,
        general_eval=general_eval,
        w0={n: linears[n].weight.detach().clone() for n in modules},
        prompt=prompt_format(ev),
        max_prompt_len=min(int(ev.max_prompt_len), max_pos - int(ev.max_new_tokens)),
    )


def _set_eval_model(run: SimpleNamespace, new, old, upto: list, same_training: bool | None, last: bool):
    """Target weights ← W0 + new merge's eval delta of stages `upto`. Returns (whether that differs
    from the source merge's eval model, same_training updated with the train models after
    `upto` unless `last`: the model the next stage trained on, by both merges)."""
    changed = old is None
    for m, w0 in run.w0.items():
        weight = run.linears[m].weight
        e_new = new.eval_delta(upto, m, weight.device)
        weight.copy_((w0.float() + e_new).to(weight.dtype))
        changed = changed or not _equal(e_new, old.eval_delta(upto, m, weight.device))
        if not last and same_training:
            t_old = old.train_delta(upto, m, weight.device) if old is not None else None
            t_new = new.train_delta(upto, m, weight.device)
            same_training = None if t_old is None or t_new is None else torch.equal(t_new, t_old)
    return changed, same_training


def _evaluate_row(run: SimpleNamespace, t: int, out: dict[str, Any], store, source: dict[str, Any]) -> None:
    """Row t of `out` on the current model: the tasks the source evaluated, GP/IP where it measured them."""
    from .evaluation.seen import evaluate_task

    cfg, ev = run.cfg, run.cfg.evaluation
    for j, task in enumerate(run.tasks):
        if not ev.full_matrix and j >= t:
            continue
        score, records = evaluate_task(
            run.model,
            run.tokenizer,
            task,
            batch_size=int(ev.batch_size),
            max_new_tokens=int(ev.max_new_tokens),
            max_prompt_len=run.max_prompt_len,
            device=run.dev,
            prompt=run.prompt,
            limit=ev.limit,
            progress=False,
            protocol=str(ev.protocol),
        )
        out["matrix"][t][j] = score
        store.save_predictions(t, task.name, records)
    if run.general_eval is not None and str(t) in source.get("general", {}):
        with store.general_work_dir() as work_dir:
            out["general"][str(t)] = run.general_eval.evaluate_general(
                run.model,
                run.tokenizer,
                cfg.general_eval,
                data_root=cfg.data.get("root"),
                work_dir=work_dir,
                device=run.dev,
                seed=int(cfg.seed),
                prompt=run.prompt,
            )


@torch.no_grad()
def _remerge_rows(
    run: SimpleNamespace, history: list, new, old, out: dict[str, Any], source: dict[str, Any], store, out_store
) -> dict[str, Any]:
    """Every row of `out` after stage 1..k: copied from the source (predictions too) when the
    eval models are bit-identical, evaluated otherwise. Returns the "remerge" block's figures."""
    k = len(history)
    evaluated, copied, seconds, same_training = [], [0], {}, True
    out_store.copy_predictions(0, store)
    for t in range(1, k + 1):
        changed, same_training = _set_eval_model(run, new, old, history[:t], same_training, last=t == k)
        if not changed:
            copied.append(t)
            out_store.copy_predictions(t, store)
            continue
        start = time.time()
        _evaluate_row(run, t, out, out_store, source)
        seconds[str(t)] = round(time.time() - start, 3)
        evaluated.append(t)
    return {"rows_evaluated": evaluated, "rows_copied": copied, "seconds": seconds, "same_training": same_training}


def _finish(out: dict[str, Any], source: dict[str, Any], run: SimpleNamespace, rows: dict[str, Any], tag: str) -> None:
    """Metrics, versions, status and the "remerge" block of the new results."""
    from .evaluation.metrics import compute_cl_metrics
    from .infra.files import package_versions

    metrics = compute_cl_metrics(out["matrix"], out["eval_sizes"])
    gp_ip = {"GP": None, "IP": None}
    if run.general_eval is not None:
        gp_ip = run.general_eval.aggregate_gp_ip(out["general"], run.cfg.general_eval, final_stage=len(run.tasks))
    metrics.update(gp_ip)
    complete = bool(source.get("complete"))
    out.update(
        metrics=metrics,
        versions=package_versions(),
        complete=complete,
        status="complete"
        if complete
        else f"remerged {len(source['stages'])} of {len(run.tasks)} stages (the source run is incomplete)",
    )
    out["remerge"] = {
        "source": "results.json",
        "merge": tag,
        "post_hoc": True,
        **rows,
        "note": (
            "eval model after stage t = W0 + X(τ_1..τ_t) over the task vectors the source run trained; "
            "equal to a run with this merge only when same_training is true"
        ),
    }


def remerge(
    run_dir: str | Path,
    overrides: list[str],
    name: str | None = None,
    device: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Recompute the merge given by `overrides` from the run in `run_dir`; returns the new results
    (also written to results.remerge-<tag>.json). ConfigError on a bad run dir or override."""
    from .data.models import resolve_device
    from .run.store import RunStore
    from .run.summary import format_summary

    choice, knobs = parse_overrides(overrides)
    tag = name or tag_of(choice, knobs)
    if not re.fullmatch(r"[A-Za-z0-9._=-]+", tag):
        raise ConfigError(f"remerge: --name {tag!r} may hold only letters, digits and . _ = -")
    store = RunStore(run_dir)
    source = _source_results(store)
    cfg = OmegaConf.create(source["config"])
    new_cfg, new, old = _merges(choice, knobs, source)
    if threads or cfg.get("threads"):
        torch.set_num_threads(int(threads or cfg.threads))
    out_store = store.variant_of(f"remerge-{tag}")
    with store.lock():  # not while the run itself writes its stage files
        history = store.history(len(source["stages"]))
        if new.eval_delta(history[:1], history[0].modules[0]) is None:
            raise ConfigError(
                f"remerge: merge={choice} does not make its eval model from the task vectors; remerge cannot rebuild it"
            )
        run = _load_run(cfg, source, history[0].modules, resolve_device(str(device or cfg.device)), store.results_path)
        out = json.loads(json.dumps(source))  # a deep copy; row 0 and unchanged rows stay as they are
        out["config"]["merge"] = OmegaConf.to_container(new_cfg, resolve=True)
        _finish(out, source, run, _remerge_rows(run, history, new, old, out, source, store, out_store), tag)
        out_store.save_results(out)
    print(format_summary(out, store.dir))
    print(
        f"remerge {tag}: rows evaluated {out['remerge']['rows_evaluated']}, copied {out['remerge']['rows_copied']}; "
        f"same training as the source run: {out['remerge']['same_training']}"
    )
    if out["remerge"]["same_training"] is False:
        print(
            f"note: merge={choice} changes the train model: a run with it would have trained every stage after the "
            "first on another model; this file is the post-hoc merge of the source run's task vectors only"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cl_bench.remerge", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the Hydra run dir of a cl_bench run (holds results.json and stages/)")
    parser.add_argument("overrides", nargs="+", help="merge=<choice> [merge.<key>=<value> ...]")
    parser.add_argument("--name", help="tag of the output files (default: the choice and the knob overrides)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the run's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the run's `threads`)")
    args = parser.parse_args(argv)
    try:
        remerge(args.run_dir, args.overrides, name=args.name, device=args.device, threads=args.threads)
    except CLBenchError as exc:
        print(f"cl_bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

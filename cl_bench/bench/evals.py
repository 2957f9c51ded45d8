"""The bench's seen-task evaluation phase: greedy generation of two tasks' eval prompts by each
variant of ModelSpec.eval_variants, side by side in one process, with the same prompts:

  unbatched    batch 1, max new tokens (no budget)
  authors      the SLICE authors' recipe: batch 8 in data order, max new tokens, the tokenizer's EOS
  ours_count   cl_bench with runs of evaluation.batch_size prompts by length (no token budget)
  ours         cl_bench with the evaluation defaults of conf/evaluation/default.yaml (token budget,
               reference margin): what a run does
  hf_generate  plain HF `generate`, batch 8 in data order, ours' per-task new-token budget
  lm_eval      lm-eval's HFLM `generate_until`, batch 8, ours' per-task new-token budget
  prefill      ours' batches through one forward pass each (no generation): prefill GFLOP/s
  forced       the same prompts forced to 32 new tokens, batch 1 against 64 (decode-bound)

Rows report how many predictions equal ours (string equality) and whether the scores do.
"""

from __future__ import annotations

import torch

from ..infra import memory
from .setup import CURRENT, PREVIOUS, Bench, ModelSpec, memory_peak, n_params, row

LABELS = {
    "unbatched": "unbatched (batch 1, fixed new tokens)",
    "authors": "authors' recipe (batch 8, data order, fixed new tokens)",
    "ours_count": "ours, count batching (batch 64 by token length, per-task new-token budget)",
    "ours": "ours (the evaluation defaults: token budget on the CPU, per-task new-token budget)",
    "hf_generate": "plain HF generate (batch 8, data order, ours' per-task budget)",
    "lm_eval": "lm-eval generate_until (batch 8, ours' per-task budget)",
}


def eval_defaults(device) -> dict:
    """conf/evaluation/default.yaml's generation settings on `device`, as evaluate_task keywords."""
    from omegaconf import OmegaConf

    from ..evaluation.seen import eval_token_budget
    from ..run.config import CONF_DIR

    ev = OmegaConf.load(CONF_DIR / "evaluation" / "default.yaml")
    return dict(
        batch_size=int(ev.batch_size),
        reference_margin=ev.get("reference_margin"),
        max_batch_tokens=eval_token_budget(ev.get("max_batch_tokens"), device),
        decode_step_tokens=int(ev.get("decode_step_tokens") or 0),
    )


def _tasks(b: Bench, spec: ModelSpec) -> list:
    from ..data.tasks.base import TaskData

    tasks = [b.tasks[CURRENT], b.tasks[PREVIOUS[-1]]]
    return [TaskData(t.name, t.metric, t.train, t.eval[: spec.eval_examples], labels=t.labels) for t in tasks]


def _budgets(tok, tasks, spec: ModelSpec, margin) -> dict[str, int]:
    from ..evaluation.seen import WHOLE_ANSWER_METRICS, new_token_budget

    return {
        t.name: new_token_budget(
            tok, t.eval, spec.eval_new_tokens, margin if t.metric_for("per_task") in WHOLE_ANSWER_METRICS else None
        )
        for t in tasks
    }


def _run_variant(b: Bench, spec: ModelSpec, key: str, model, tok, tasks, budgets) -> tuple[list, list, dict]:
    """(predictions per task, score per task, counts) of one variant."""
    from ..data.prompts import PromptFormat, pad_id_of, render_prompt_text
    from ..evaluation.scoring import score
    from ..evaluation.seen import evaluate_task
    from .real import hf_generate, lm_eval_generate
    from .recipes import authors_eval

    common = dict(
        max_new_tokens=spec.eval_new_tokens,
        max_prompt_len=spec.eval_prompt_len,
        device=b.device,
        prompt=PromptFormat(),
        progress=False,
    )
    kwargs = {
        "unbatched": dict(batch_size=1, reference_margin=None),
        "ours_count": dict(batch_size=64, reference_margin=8),
        "ours": eval_defaults(b.device),
    }
    preds, scores, counts = [], [], {"generated_tokens": 0, "prompt_tokens": 0, "fed_prompt_tokens": 0}
    for t in tasks:
        if key == "authors":
            st = {"generated_tokens": 0, "prompt_tokens": 0, "predictions": [], "predictions_cut": []}
            st["cut"] = budgets[t.name]  # compared with ours on the same new tokens (greedy: a prefix)
            scores.append(authors_eval(model, tok, t, spec, b.device, pad_id_of(tok), st))
            preds.append(st["predictions_cut"])
            counts["generated_tokens"] += st["generated_tokens"]
            counts["prompt_tokens"] += st["prompt_tokens"]
            continue
        if key in kwargs:
            st: dict = {}
            s, records = evaluate_task(model, tok, t, stats=st, **common, **kwargs[key])
            preds.append([r["prediction"] for r in records])
            scores.append(s)
            for k in counts:
                counts[k] += st.get(k, 0)
            continue
        texts = [render_prompt_text(tok, ex, PromptFormat()) for ex in t.eval]
        if key == "hf_generate":
            p = hf_generate(model, tok, texts, budgets[t.name], 8, b.device)
        else:
            p = lm_eval_generate(model, tok, texts, budgets[t.name], 8)
        preds.append(p)
        metric = t.metric_for("per_task")
        scores.append(100.0 * sum(score(metric, x, ex.all_references, t.labels) for x, ex in zip(p, t.eval)) / len(p))
    return preds, scores, counts


def phase_eval(b: Bench, spec: ModelSpec) -> list[dict]:
    """Every variant of spec.eval_variants on the same two tasks (module doc)."""
    from .setup import build_model

    model, tok = build_model(spec, b)
    tasks = _tasks(b, spec)
    n = sum(len(t.eval) for t in tasks)
    budgets = _budgets(tok, tasks, spec, eval_defaults(b.device)["reference_margin"])
    rows, outputs = [], {}
    for key in [v for v in spec.eval_variants if v in LABELS]:
        memory.reset_peak(b.device)
        t0 = b.clock()
        preds, scores, counts = _run_variant(b, spec, key, model, tok, tasks, budgets)
        t = b.since(t0)
        outputs[key] = (preds, scores)
        rows.append(
            row(
                spec.name,
                "eval",
                LABELS[key],
                t,
                key=key,
                tokens=(counts["prompt_tokens"] + counts["generated_tokens"]) or None,
                examples=n,
                scores=scores,
                **counts,
                **memory_peak(b.device),
            )
        )
    ref_key = "ours" if "ours" in outputs else next(iter(outputs), None)
    for r in rows:
        mine, ref = outputs[r["key"]], outputs[ref_key]
        r["same_scores_as_ours"] = mine[1] == ref[1]
        r["same_predictions_as_ours"] = sum(a == c for p, q in zip(mine[0], ref[0]) for a, c in zip(p, q))
        r["same_scores_as_unbatched"] = mine[1] == outputs.get("unbatched", mine)[1]
    if "prefill" in spec.eval_variants:
        rows.append(_prefill_row(b, spec, model, tok, tasks, budgets))
    if "forced" in spec.eval_variants:
        rows += _forced_rows(b, spec, model, tok, tasks)
    return rows


@torch.no_grad()
def _prefill_row(b: Bench, spec: ModelSpec, model, tok, tasks, budgets: dict[str, int]) -> dict:
    """One forward pass per batch of ours' plan (logits at the last position only, as generate's
    prefill): 2·N_layers per real prompt token + 2·N_head per row, per second."""
    from ..data.prompts import PromptFormat, left_padded, pad_id_of, render_prompt_ids, truncate_middle
    from ..evaluation.seen import plan_batches

    d = eval_defaults(b.device)
    sizes = n_params(model)
    real = fed = rows_n = 0
    memory.reset_peak(b.device)
    t0 = b.clock()
    for t in tasks:
        rows = [truncate_middle(render_prompt_ids(tok, ex, PromptFormat()), spec.eval_prompt_len) for ex in t.eval]
        overhead = d["decode_step_tokens"] * budgets[t.name]
        for idx in plan_batches([len(r) for r in rows], d["batch_size"], d["max_batch_tokens"], overhead):
            batch = {k: v.to(b.device) for k, v in left_padded([rows[i] for i in idx], pad_id_of(tok)).items()}
            model(**batch, use_cache=False, logits_to_keep=1)
            real += int(batch["attention_mask"].sum())
            fed += batch["input_ids"].numel()
            rows_n += len(idx)
    t = b.since(t0)
    flops = 2 * (sizes["layers"] * real + sizes["lm_head"] * rows_n)
    return row(
        spec.name,
        "eval",
        "prefill only (ours' batches, one forward each)",
        t,
        key="prefill",
        tokens=real,
        fed_prompt_tokens=fed,
        padding=1 - real / fed if fed else None,
        model_gflop=flops / 1e9,
        gflops=flops / t["seconds"] / 1e9,
        **memory_peak(b.device),
    )


def _forced_rows(b: Bench, spec: ModelSpec, model, tok, tasks) -> list[dict]:
    """The same prompts with every row forced to 32 new tokens (no early end): the decode-bound
    regime of a model that answers at length, batch 1 against batch 64."""
    from ..data.prompts import PromptFormat, render_prompt_ids, truncate_middle
    from .recipes import forced_generate

    forced = 32
    prompts = [
        truncate_middle(render_prompt_ids(tok, ex, PromptFormat()), spec.eval_prompt_len)
        for t in tasks
        for ex in t.eval
    ]
    prompts.sort(key=len, reverse=True)
    rows = []
    for bs in (1, 64):
        memory.reset_peak(b.device)
        t0 = b.clock()
        for i in range(0, len(prompts), bs):
            forced_generate(model, tok, prompts[i : i + bs], forced, b.device)
        rows.append(
            row(
                spec.name,
                "eval",
                f"forced {forced} new tokens, batch {bs}",
                b.since(t0),
                key=f"forced{bs}",
                tokens=sum(map(len, prompts)) + forced * len(prompts),
                examples=len(prompts),
                generated_tokens=forced * len(prompts),
                **memory_peak(b.device),
            )
        )
    return rows

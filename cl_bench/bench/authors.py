"""The SLICE authors' whole pipeline as the bench models it (from their released code and the paper),
for the whole-run rows of `--model smollm2`: one stage loop over the same tasks, examples, LoRA
and trainer settings as a cl_bench run, each part done the authors' way:

* wrap: a fresh PEFT adapter on the merged model every stage;
* init (LoRA-GA / SLICE): the gradient capture with activation checkpointing on, the model in
  train mode, the loss over every token (labels = inputs, pads ignored), each batch's full-weight
  `.grad` added into an accumulator and zeroed (one pass per capture batch); then the same
  projection + exact SVD + rescale as cl_bench (the math is not what is timed), W -= s·B0·A0;
* train: `recipes.reference_train` (HF Trainer's defaults: padded micro-batches, the loss over every
  position's logits, foreach AdamW, a host sync per micro-batch);
* save: the adapter written twice (`save_pretrained`) with the absorbed init (`init_correction`)
  beside each copy;
* merge: `merge_and_unload()`;
* evaluate the seen tasks only (j <= i, no row 0): `recipes.authors_eval` (batch 8 in data order,
  max_new_tokens new tokens unless every row emitted the tokenizer's EOS).
GP/IP are not part of it (nor of the cl_bench runs it is compared with): lm-eval is the same
code on both sides (the GP/IP phase times it).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Iterator

import torch

from ..initializers.capture import Capture


def authors_capture(model, weights, batches, *, offload=False, transposed=(), max_tokens=None, dist=None) -> Capture:
    """The authors' capture (module doc), with capture_gradients' signature and result: the mean
    over batches of each batch's mean-token-loss gradient, fp32, [d_out, d_in]."""
    start = time.perf_counter()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    flags = {n: w.requires_grad for n, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    acc = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    losses, steps = [], 0
    model.train()
    try:
        for batch in batches:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            loss.backward()
            losses.append(float(loss.detach()))
            for n, w in weights.items():
                if w.grad is not None:
                    acc[n].add_(w.grad)
                    w.grad = None
            model.zero_grad(set_to_none=True)
            steps += 1
    finally:
        model.eval()
        base.gradient_checkpointing_disable()
        for n, w in weights.items():
            w.requires_grad_(flags[n])
    grads = {
        n: (a / max(1, steps)).T.contiguous() if n in set(transposed) else a / max(1, steps) for n, a in acc.items()
    }
    return Capture(
        grads, steps, sum(losses) / max(1, len(losses)), time.perf_counter() - start, {"forward_passes": steps}
    )


@contextlib.contextmanager
def authors_capture_in_place() -> Iterator[None]:
    """cl_bench's initializers capture the authors' way inside the block (the bench's child process)."""
    from ..initializers import gradient

    saved = gradient.capture_gradients
    gradient.capture_gradients = authors_capture
    try:
        yield
    finally:
        gradient.capture_gradients = saved


def _context(stage: int, tasks: list, rank: int, alpha: float, targets: list[str], encoder, device, seed: int):
    from ..lora.layers import lora_scaling
    from ..stage import StageContext, stage_seed

    return StageContext(
        stage=stage,
        current=tasks[stage - 1],
        previous=tasks[: stage - 1],
        tasks=tasks,
        rank=rank,
        alpha=alpha,
        scaling=lora_scaling(alpha, rank, "rslora"),
        target_modules=targets,
        device=device,
        seed=stage_seed(seed, stage),
        make_batches=lambda t, n, bs, sd, indices=None: encoder.batches(t, n, bs, sd, device, indices),
        cache_dir=None,
        log=lambda s: None,
        adapter="default",
    )


def authors_run(model, tok, tasks: list, *, init: str, settings: dict, device, clock=time.process_time) -> dict:
    """The authors' pipeline (module doc) on `model` (changed in place: stages merge into it).
    `settings`: rank, alpha, targets, max_len, batch_size, epochs, seed, capture_steps,
    capture_batch_size, max_new_tokens, max_prompt_len. `clock`: the bench's seconds (CPU
    seconds on one thread). Returns {"seconds": {phase: s}, "matrix": lower triangle in percent
    (None above it)}."""
    from peft import LoraConfig, get_peft_model

    from ..data.prompts import TrainingEncoder, pad_id_of
    from ..initializers.gradient import LoraGA, Slice
    from ..lora.layers import WeightMaster, apply_init, set_scaling
    from .recipes import authors_eval, reference_train
    from .setup import ModelSpec

    s = settings
    encoder = TrainingEncoder(tok, s["max_len"], True, True)
    spec = ModelSpec("authors", eval_new_tokens=s["max_new_tokens"], eval_prompt_len=s["max_prompt_len"])
    seconds = dict.fromkeys(("init", "train", "save", "merge", "eval"), 0.0)
    T = len(tasks)
    matrix = [[None] * T for _ in range(T)]
    counts = {"generated_tokens": 0, "prompt_tokens": 0}
    with tempfile.TemporaryDirectory(prefix="cl_bench_authors_") as out:
        for stage in range(1, T + 1):
            ctx = _context(stage, tasks, s["rank"], s["alpha"], s["targets"], encoder, device, s["seed"])
            torch.manual_seed(ctx.seed)
            t0 = clock()
            lora = LoraConfig(
                r=s["rank"], lora_alpha=s["alpha"], target_modules=s["targets"], use_rslora=True, lora_dropout=0.0
            )
            master = WeightMaster.attach(model, s["targets"])  # fp32 weights: no copies, W is folded directly
            peft = get_peft_model(model, lora)
            init_factors = None
            if init != "vanilla":
                knobs = dict(capture_steps=s["capture_steps"], capture_batch_size=s["capture_batch_size"], svd="exact")
                initializer = Slice(**knobs) if init == "slice" else LoraGA(**knobs)
                with authors_capture_in_place():
                    result = initializer.init(peft, ctx)
                set_scaling(peft, "default", "rslora")
                apply_init(peft, result, "default", master)
                init_factors = {n: (a.cpu(), b.cpu()) for n, (a, b) in result.factors.items()}
            seconds["init"] += clock() - t0
            t0 = clock()
            steps = math.ceil(len(ctx.current.train) / s["batch_size"]) * s["epochs"]
            reference_train(peft, encoder, ctx.current, ctx.seed, steps, s["batch_size"], 1, device)
            seconds["train"] += clock() - t0
            t0 = clock()
            for copy in ("outputs", "results"):  # the authors write every stage's adapter twice
                folder = f"{out}/{copy}/stage_{stage:02d}"
                peft.save_pretrained(folder)
                if init_factors is not None:
                    torch.save(init_factors, f"{folder}/init_correction.pt")
            seconds["save"] += clock() - t0
            t0 = clock()
            model = peft.merge_and_unload()
            seconds["merge"] += clock() - t0
            t0 = clock()
            for j in range(stage):
                matrix[stage - 1][j] = authors_eval(model, tok, tasks[j], spec, device, pad_id_of(tok), counts)
            seconds["eval"] += clock() - t0
    return {"seconds": seconds, "matrix": matrix, **counts}

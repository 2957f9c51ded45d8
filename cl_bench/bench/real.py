"""The bench's side-by-side references on a real model (`--model smollm2`): what a user would write
by hand with Hugging Face (a `transformers.Trainer` + PEFT loop, plain `generate`, lm-eval's
`generate_until`), the matmul ceiling of this CPU / device measured in the same process, the model
load (first GGUF conversion, then the cached folder) and the bf16-on-CPU trial.

Achieved GFLOP/s of LoRA training on a frozen base ≈ 4·N·tokens (forward 2·N, backward 2·N for the
activations' gradients; no weight gradient of the frozen N): N = the parameters of the decoder
layers for every real (unpadded) token, plus the LM head's for every position whose logits are
computed; attention's score FLOPs (∝ sequence²) and the small LoRA products are not counted, so
the figure is what the model's matmuls need, and padding counts as waste. Evaluation prefill:
2·N per real prompt token.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch


# ------------------------------------------------------------------------------ the matmul ceiling
def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_fast_bf16(device: torch.device) -> bool:
    """bf16 matmuls in hardware: CUDA, or a CPU with avx512_bf16 / AMX (amx_bf16)."""
    if device.type == "cuda":
        return True
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, device, repeats: int = 5) -> float:
    """Best GFLOP/s of one [m, k] x [k, n] torch.mm over `repeats` (after one warm-up), in CPU
    seconds on a one-thread CPU (what other load does not inflate), wall seconds otherwise."""
    from .setup import sync_device

    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    torch.mm(a, b)
    one_thread = device.type == "cpu" and torch.get_num_threads() == 1
    clock = time.process_time if one_thread else time.perf_counter
    best = math.inf
    for _ in range(repeats):
        sync_device(device)
        t0 = clock()
        torch.mm(a, b)
        sync_device(device)
        best = min(best, clock() - t0)
    return 2.0 * m * k * n / max(best, 1e-9) / 1e9


def matmul_ceiling(device, shapes: list[tuple[int, int]], tokens: int, square: int | None = None) -> dict:
    """The matmul rates this process reaches on its threads: a 2048³ fp32 product (the ceiling the
    targets use), the model's own linear shapes at `tokens` rows (forward x·Wᵀ and the backward's
    g·W, FLOP-weighted), and bf16 where the hardware has it (else why not)."""
    square = square or (2048 if device.type == "cpu" else 8192)
    out: dict = {"fp32_square_gflops": matmul_gflops(square, square, square, torch.float32, device)}
    flops = secs = 0.0
    for d_out, d_in in sorted(set(shapes)):
        for m, k, n in ((tokens, d_in, d_out), (tokens, d_out, d_in)):
            rate = matmul_gflops(m, k, n, torch.float32, device, repeats=3)
            f = 2.0 * m * k * n
            flops, secs = flops + f, secs + f / (rate * 1e9)
    out["fp32_model_shapes_gflops"] = flops / secs / 1e9 if secs else None
    out["model_shapes_tokens"] = tokens
    out["square"] = square
    if has_fast_bf16(device):
        out["bf16_square_gflops"] = matmul_gflops(square, square, square, torch.bfloat16, device)
    else:
        out["bf16_square_gflops"] = None
        out["bf16_note"] = "not measured as a ceiling: the CPU flags have neither avx512_bf16 nor amx_bf16"
        small = min(square, 1024)
        out[f"bf16_square_{small}_gflops_emulated"] = matmul_gflops(
            small, small, small, torch.bfloat16, device, repeats=1
        )
    return out


def target_shapes(model, targets: list[str]) -> list[tuple[int, int]]:
    """(d_out, d_in) of every target Linear (one entry per module)."""
    from ..lora.layers import target_linears

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [(m.out_features, m.in_features) for m in target_linears(base, targets).values()]


# ------------------------------------------------------------------------------ HF Trainer + PEFT
def hf_trainer_train(peft, tok, encoder, task, seed: int, steps: int, bs: int, accum: int, bf16: bool = False) -> dict:
    """What a user writes by hand: `transformers.Trainer` on the PEFT model, the same examples
    (the first steps·bs·accum of our order; the Trainer shuffles them itself), the same LoRA,
    learning rate, schedule and clipping, `DataCollatorForSeq2Seq` padding each batch to its
    longest (right), the model's own loss over every position. Returns tokens (real), fed
    tokens, examples, the loss curve and the Trainer's own seconds."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    order = encoder.order(task, seed, epochs=math.ceil(steps * bs * accum / len(task.train)) + 1)
    encoded = encoder.encode_task(task)
    rows = [
        {"input_ids": encoded[i].input_ids, "labels": encoded[i].labels, "attention_mask": [1] * len(encoded[i].labels)}
        for i in order[: steps * bs * accum]
    ]
    side, tok.padding_side = tok.padding_side, "right"
    losses: list[float] = []
    with tempfile.TemporaryDirectory(prefix="cl_bench_hf_trainer_") as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=accum,
            max_steps=steps,
            learning_rate=1e-4,
            weight_decay=0.0,
            warmup_steps=math.ceil(0.01 * steps),  # the 1 % warm-up of the other loops
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            bf16=bf16,
            dataloader_num_workers=0,
            seed=seed,
            disable_tqdm=True,
        )
        collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
        fed = [0]

        def collate(features):
            batch = collator(features)
            fed[0] += batch["input_ids"].numel()
            return batch

        trainer = Trainer(model=peft, args=args, train_dataset=rows, data_collator=collate)
        try:
            trainer.train()
        finally:
            tok.padding_side = side
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peft.eval()
    return {
        "loss_curve": losses,
        "tokens": sum(len(r["input_ids"]) for r in rows),
        "fed_tokens": fed[0],
        "examples": len(rows),
        "logit_positions": fed[0],
        "forward_passes": steps * accum,
    }


# ------------------------------------------------------------------------------ evaluation references
@torch.no_grad()
def hf_generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, device) -> list[str]:
    """Plain HF `generate` on rendered prompt texts, `batch_size` at a time in the given order,
    the tokenizer's own left padding, greedy, the model's generation config for end tokens."""
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        cont = gen[:, enc["input_ids"].shape[1] :]
        out += [tok.decode(c, skip_special_tokens=True).strip() for c in cont]
    return out


def lm_eval_generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """lm-eval's HFLM `generate_until` on the same rendered prompts (its own batching by length,
    greedy, until the tokenizer's EOS), stripped."""
    import logging

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    until = [tok.eos_token] if tok.eos_token else []
    reqs = [
        Instance(
            request_type="generate_until",
            doc={},
            arguments=(p, {"until": until, "max_gen_toks": max_new_tokens, "do_sample": False}),
            idx=i,
        )
        for i, p in enumerate(prompts)
    ]
    return [s.strip() for s in lm.generate_until(reqs, disable_tqdm=True)]


# ------------------------------------------------------------------------------ model load
def phase_load(b, spec) -> list[dict]:
    """SmolLM2: the first load converts the GGUF file into a fresh cache folder (dequantise,
    write safetensors + tokenizer); the second reads that folder, as every later run does."""
    from omegaconf import OmegaConf

    from ..data.models import load_model
    from ..run.config import CONF_DIR
    from .setup import memory_peak, row

    cfg = OmegaConf.load(CONF_DIR / "model" / "smollm2.yaml")
    cfg.dtype = "float32"
    rows = []
    with tempfile.TemporaryDirectory(prefix="cl_bench_load_") as cache:
        for label in ("first load: GGUF conversion into the cache", "cached load (every later run)"):
            t0 = b.clock()
            model, _ = load_model(cfg, torch.device("cpu"), cache, log=lambda s: None)
            model.to(b.device)
            t = b.since(t0)
            n = sum(p.numel() for p in model.parameters())
            size = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file())
            rows.append(row(spec.name, "load", label, t, parameters=n, cache_mb=size / 1e6, **memory_peak(b.device)))
            del model
    return rows


# ------------------------------------------------------------------------------ bf16 on this device
def phase_bf16(b, spec) -> list[dict]:
    """The bf16 trial: one training step of 2 examples (the authors' loop, so the three are the
    same code) and one prefill pass of 4 prompts, in fp32, under bf16 autocast, and with bf16
    weights (where a run would keep the fp32 master); the matmul rates say why. Kept tiny: a CPU
    without avx512_bf16 / AMX runs bf16 an order of magnitude slower."""
    from ..data.prompts import PromptFormat, left_padded, pad_id_of, render_prompt_ids, truncate_middle
    from .recipes import reference_train
    from .setup import CURRENT, build_model, context, encoder_for, row, wrap

    model, tok = build_model(spec, b)
    encoder = encoder_for(tok, spec)
    peft = wrap(model, spec)
    ctx = context(b, spec, encoder, 1)
    prompts = [truncate_middle(render_prompt_ids(tok, ex, PromptFormat()), 448) for ex in b.tasks[CURRENT].eval[:4]]
    batch = {k: v.to(b.device) for k, v in left_padded(prompts, pad_id_of(tok)).items()}
    start = {n: p.detach().clone() for n, p in peft.named_parameters()}
    rows = []
    for label, autocast, dtype in (
        ("fp32", False, torch.float32),
        ("bf16 autocast", True, torch.float32),
        ("bf16 weights", False, torch.bfloat16),
    ):
        with torch.no_grad():
            for n, p in peft.named_parameters():
                p.data = start[n].to(dtype)
        t0 = b.clock()
        out = reference_train(peft, encoder, ctx.current, ctx.seed, 1, 2, 1, b.device, autocast=autocast)
        t_train = b.since(t0)
        t0 = b.clock()
        with torch.no_grad(), torch.autocast(b.device.type, dtype=torch.bfloat16, enabled=autocast):
            peft(**batch, use_cache=False, logits_to_keep=1)
        t_prefill = b.since(t0)
        extra = dict(key=f"bf16:{label}", loss_curve=out["loss_curve"])
        rows.append(
            row(spec.name, "bf16 trial", f"train 1 step x 2 examples, {label}", t_train, tokens=out["tokens"], **extra)
        )
        rows.append(
            row(
                spec.name,
                "bf16 trial",
                f"prefill 4 prompts, {label}",
                t_prefill,
                tokens=int(batch["attention_mask"].sum()),
                **extra,
            )
        )
    with torch.no_grad():
        for n, p in peft.named_parameters():
            p.data = start[n]
    return rows

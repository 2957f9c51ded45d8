"""What every bench phase builds on: the model specs (ModelSpec), the run's shared state (Bench,
its clock), the models (tiny, or the Llama-3.2-3B shape with random weights), the tasks (SuperNI
samples or generated ones), LoRA wrapping, stage contexts and encoders, and the table rows.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from ..infra import memory
from ..run.config import CONF_DIR

REPO = CONF_DIR.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# meta-llama/Llama-3.2-3B(-Instruct) config.json, the fields that shape compute and memory.
LLAMA_3_2_3B = dict(
    vocab_size=128256,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    hidden_act="silu",
    rope_theta=500000.0,
    rope_scaling={
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
)

# SuperNI samples: the current task has mixed lengths (60-160 tiny-tokenizer tokens); four
# others stand for the previous tasks of stage 5 and a second evaluation task.
CURRENT = "task591_sciq_answer_generation"
PREVIOUS = [
    "task1687_sentiment140_classification",
    "task363_sst2_polarity_classification",
    "task875_emotion_classification",
    "task1510_evalution_relation_extraction",
]
# The paper's SuperNI tasks train ~590 optimizer steps of 32 over 3 epochs (ref §9): ~6300 examples.
PAPER_TRAIN_EXAMPLES = 6300


@dataclass
class ModelSpec:
    """One model's bench settings: its shape, the LoRA rank, batch sizes and steps, and which phases run."""

    name: str  # tiny | llama3b | smollm2
    layers: int | None = None  # llama3b decoder layers (None: all 28)
    rank: int = 8
    max_len: int = 256
    batch_size: int = 16  # training micro-batch (paper: 16 x accum 2)
    grad_accum: int = 2
    train_steps: int = 4
    capture_steps: int = 8  # paper: 8 batches of 16 per task
    capture_batch_size: int = 16
    stages: tuple[int, ...] = (1, 5)
    eval_examples: int = 32  # per evaluation task (two tasks)
    eval_new_tokens: int = 64  # the authors' max_new_tokens
    eval_prompt_len: int = 448
    capture_max_tokens: int | None = 1024  # a second init row at the last stage with this cap (None: none)
    phases: tuple[str, ...] = ("init", "csweep", "train", "merge", "eval", "gpip", "exact")
    train_variants: tuple[str, ...] = ("group", "pad", "pack", "reference", "group+ckpt")
    eval_variants: tuple[str, ...] = ("unbatched", "authors", "ours", "forced")
    gpip_limit: int = 30  # documents per GP/IP benchmark
    gpip_batches: tuple = (1, 32)  # lm-eval batch sizes on the CPU (CUDA: 1 and auto)
    # whole runs (phase runs, real model only): examples per task and the inits compared
    run_train: int = 32
    run_eval: int = 16
    run_inits: tuple[str, ...] = ("vanilla", "lora_ga", "slice")
    ceiling_square: int | None = None  # the matmul ceiling's square size (None: 2048 CPU, 8192 CUDA)

    @property
    def alpha(self) -> float:
        """LoRA alpha: 2r on the tiny model and SmolLM2 (cl_bench's default 16 at r 8), the paper's 2 on llama3b."""
        return 2.0 if self.name == "llama3b" else 2.0 * self.rank


@dataclass
class Bench:
    """The run's shared state: device, threads, data, the rows measured so far, and its clock."""

    device: torch.device
    threads: int
    cache_dir: str
    data_root: str | None
    repeats: int
    compile: bool
    tasks: dict = field(default_factory=dict)  # name -> TaskData
    n_train: int = 0  # training examples of the current task
    data_source: str = ""
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # "cpu": process CPU seconds (one thread on a CPU device: what a shared machine's load does not
    # inflate); "wall": wall seconds (CUDA, synchronised; or several CPU threads)
    basis: str = "wall"

    def clock(self) -> tuple[float, float]:
        sync_device(self.device)
        return time.perf_counter(), time.process_time()

    def since(self, t: tuple[float, float]) -> dict:
        sync_device(self.device)
        wall, cpu = time.perf_counter() - t[0], time.process_time() - t[1]
        return {"seconds": cpu if self.basis == "cpu" else wall, "wall_s": wall, "cpu_s": cpu}


def build_model(spec: ModelSpec, b: Bench):
    """(model, tokenizer) on b.device, eval mode. llama3b: random weights, seed 0; smollm2: the
    real weights (fp32 on the CPU, bf16 on CUDA)."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from ..data.models import load_model, resolve_dtype
    from ..data.tiny_model import ensure_tiny_model

    if spec.name == "tiny":
        cfg = OmegaConf.create(
            {"builder": "tiny", "name_or_path": "tiny", "dtype": "float32", "attn_implementation": "sdpa"}
        )
        return load_model(cfg, b.device, b.cache_dir, log=lambda s: None)
    if spec.name == "smollm2":  # the real model (conf/model/smollm2.yaml), converted once into the cache
        cfg = OmegaConf.load(CONF_DIR / "model" / "smollm2.yaml")
        cfg.dtype = "auto" if b.device.type == "cuda" else "float32"
        return load_model(cfg, b.device, b.cache_dir, log=lambda s: None)
    tok = AutoTokenizer.from_pretrained(ensure_tiny_model(b.cache_dir, log=lambda s: None))
    tok.padding_side = "left"
    config = LlamaConfig(
        **{**LLAMA_3_2_3B, "num_hidden_layers": spec.layers or LLAMA_3_2_3B["num_hidden_layers"]},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    dtype = resolve_dtype("auto", b.device)
    torch.manual_seed(0)
    with torch.device(b.device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def n_params(model) -> dict[str, int]:
    """Parameters that multiply every token: decoder-layer matrices; and the LM head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings().weight.numel()
    body = sum(p.numel() for n, p in base.named_parameters() if ".layers." in n and "lora_" not in n)
    return {"layers": body, "lm_head": head}


def load_tasks(b: Bench, tokenizer) -> None:
    """The SuperNI samples (or generated mixed-length tasks) every phase uses."""
    from omegaconf import OmegaConf

    from ..data.tasks import load_sequence
    from ..infra.errors import DataError

    seq = OmegaConf.create(
        {"name": "bench", "family": "superni", "tasks": [CURRENT, *PREVIOUS], "n_train": None, "n_eval": 32}
    )
    try:
        tasks = load_sequence(seq, b.data_root, 42)
        b.data_source = f"SuperNI samples ({b.data_root})"
    except DataError:
        tasks = generated_tasks()
        b.data_source = "generated mixed-length tasks (SuperNI samples not found: pass --data-root)"
    b.tasks = {t.name: t for t in tasks}


def generated_tasks() -> list:
    """Five tasks of word lists with log-normal lengths (10-150 words) and one-word answers."""
    from ..data.tasks.base import Example, TaskData
    from ..data.wordlists import COLORS, NOUNS, VERBS

    out = []
    for k, name in enumerate([CURRENT, *PREVIOUS]):
        rng = random.Random(k)
        examples = []
        for i in range(432):
            n = int(min(150, max(10, rng.lognormvariate(3.3, 0.6))))
            words = [rng.choice(NOUNS + COLORS + VERBS) for _ in range(n)]
            examples.append(
                Example(f"{name}-{i}", "Which word comes last in the list?\nList: " + " ".join(words), words[-1])
            )
        out.append(TaskData(name, "exact_match", examples[32:], examples[:32], origin="generated"))
    return out


def wrap(model, spec: ModelSpec, adapter: str = "stage_01"):
    """`model` as a PEFT model with one rsLoRA adapter of rank spec.rank on TARGETS (no dropout)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=TARGETS,
        use_rslora=True,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg, adapter_name=adapter)


def context(b: Bench, spec: ModelSpec, encoder, stage: int, cache_dir: str | None = None, adapter: str = "stage_01"):
    """The StageContext of `stage`: the current task after stage - 1 previous ones, on b.device."""
    from ..lora.layers import lora_scaling
    from ..stage import StageContext

    names = [*PREVIOUS[: stage - 1][::-1], CURRENT]  # stage k: k-1 previous tasks, then the current one
    tasks = [b.tasks[n] for n in names]
    alpha = spec.alpha
    return StageContext(
        stage=stage,
        current=tasks[-1],
        previous=tasks[:-1],
        rank=spec.rank,
        alpha=alpha,
        scaling=lora_scaling(alpha, spec.rank, "rslora"),
        target_modules=TARGETS,
        device=b.device,
        seed=42000 + stage,
        make_batches=lambda t, n, bs, seed: encoder.batches(t, n, bs, seed, b.device),
        cache_dir=cache_dir,
        log=lambda s: None,
        adapter=adapter,
        grad_accum=spec.grad_accum,
    )


def encoder_for(tok, spec: ModelSpec):
    """The training encoder (rows of at most spec.max_len tokens)."""
    from ..data.prompts import TrainingEncoder

    return TrainingEncoder(tok, spec.max_len, True, True)


def sync_device(device) -> None:
    """Wait for the device's queued work (CUDA), so a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_peak(device) -> dict:
    """This phase's peak memory row fields: CUDA max allocated, or the RSS high-water mark (MB)."""
    p = memory.peak_mb(device)
    if device.type == "cuda":
        return {"peak_mb": p["cuda_max_allocated_mb"], "peak_kind": "CUDA max allocated"}
    return {"peak_mb": p["rss_peak_mb"], "peak_kind": f"RSS peak ({p['rss_peak_scope']})"}


def row(
    model: str,
    phase: str,
    variant: str,
    t: dict | float,
    *,
    tokens: int | None = None,
    examples: int | None = None,
    **extra,
) -> dict:
    """One table row; `t` is Bench.since(...) (or plain seconds); rates use t["seconds"]."""
    t = t if isinstance(t, dict) else {"seconds": t}
    seconds = t["seconds"]
    return {
        "model": model,
        "phase": phase,
        "variant": variant,
        **t,
        "tokens": tokens,
        "examples": examples,
        "tokens_per_s": tokens / seconds if tokens and seconds > 0 else None,
        "examples_per_s": examples / seconds if examples and seconds > 0 else None,
        **extra,
    }

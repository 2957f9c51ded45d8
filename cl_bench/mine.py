"""Mine adversarial task sequences: NI-Seq-Opposite (SLICE paper, App. C).

    python -m cl_bench.mine --pool task088,task1510,... --data-root DIR --size 5 --top-k 10 --out DIR

1. For every task of the pool: the mean gradient of the *base* model's training loss (answer
   tokens, as in training) w.r.t. every target Linear weight, over `--steps` batches of
   `--batch-size` examples drawn only from the task's training split (the split the runs use
   with the same n_eval and seed, so evaluated examples never enter the calibration set).
2. Each gradient g_i (all modules concatenated) is compressed to a CountSketch of `--sketch-dim`
   buckets: every coordinate goes to one bucket with a random sign, both drawn from a generator
   seeded by (seed, module name), so all tasks share the same hash. ⟨sketch_i, sketch_j⟩ is an
   unbiased estimate of ⟨g_i, g_j⟩ (std. error ≈ ‖g_i‖‖g_j‖/√dim); the norms are exact. So
   cos_ij ≈ ⟨sketch_i, sketch_j⟩ / (‖g_i‖‖g_j‖). `--sketch-dim 0` keeps the full vectors
   (exact, for small models).
3. Exhaustive search over all C(M, N) subsets for the lowest mean pairwise cosine (Eq. 13-14),
   vectorised: for each first element, all completions are scored at once from precomputed
   (N-1)-subset sums.
4. The top-k subsets become sequence YAMLs. Order inside a sequence is a rule, not the
   alphabet: `greedy` starts with the task most in conflict with the rest of the subset and
   then appends the task with the lowest mean cosine to the tasks already placed (the previous
   tasks a SLICE-style init projects against); `given` keeps the pool order.

Outputs in --out: cosine.csv, cosine.png (heatmap), sequences/<prefix>_<rank>.yaml, mining.json.

Plain argparse rather than Hydra: this is a one-shot tool with no config groups to compose and
no multirun, and the flags above are its whole interface.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .infra.errors import CLBenchError, ConfigError, DataError
from .lora.linalg import module_seed

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Named SuperNI pools (short ids; resolved through the family's task table). `diverse46` is the
# SLICE authors' 46-task search pool; `slice61` adds the rest of their 26 original tasks (with
# NI488 = task488, not the task448 of their registry), the pool the paper's Opp sequences need.
_EXTENSION35 = (
    "077 079 085 086 087 088 090 092 119 161 179 180 181 183 199 205 206 208 209 243 271 286 "
    "325 327 376 425 513 517 828 1152 1332 1346 1429 1582 1711"
).split()
_ORIGINAL26 = (
    "195 1343 1310 1292 363 231 220 224 273 360 1510 618 1290 589 511 1357 1355 141 619 163 002 339 611 292 488 024"
).split()
NAMED_POOLS: dict[str, list[str]] = {
    "diverse46": _EXTENSION35 + "195 363 1292 1310 1343 024 511 589 618 1290 1357".split(),
    "slice61": _EXTENSION35 + _ORIGINAL26,
}


# ------------------------------------------------------------------------ sketching


@dataclass
class GradientSketch:
    vector: torch.Tensor  # float64 [dim] (CountSketch) or the full flattened gradient
    norm: float  # exact ‖g‖ over all modules


def count_sketch(grads: dict[str, torch.Tensor], dim: int, seed: int) -> GradientSketch:
    """CountSketch of the concatenation of `grads` (modules in sorted-name order); dim=0 = exact."""
    if dim < 0:
        raise ConfigError(f"--sketch-dim={dim} must be >= 0 (0 = no sketch)")
    names = sorted(grads)
    sq_norm = sum(float(grads[n].double().pow(2).sum()) for n in names)
    if dim == 0:
        vector = torch.cat([grads[n].reshape(-1).double().cpu() for n in names])
        return GradientSketch(vector, math.sqrt(sq_norm))
    # Hashes are drawn on the CPU so a sketch does not depend on where the gradient lives.
    vector = torch.zeros(dim, dtype=torch.float64)
    for name in names:
        flat = grads[name].reshape(-1).double().cpu()
        gen = torch.Generator().manual_seed(module_seed(seed, name))
        buckets = torch.randint(dim, (flat.numel(),), generator=gen)
        signs = torch.randint(2, (flat.numel(),), generator=gen, dtype=torch.int8) * 2 - 1
        vector.index_add_(0, buckets, flat * signs)
    return GradientSketch(vector, math.sqrt(sq_norm))


def cosine_matrix(sketches: Sequence[GradientSketch]) -> np.ndarray:
    """Pairwise cosine estimates; diagonal exactly 1, clipped to [-1, 1]."""
    stacked = torch.stack([s.vector for s in sketches])
    norms = torch.tensor([s.norm for s in sketches], dtype=torch.float64)
    if bool((norms == 0).any()):
        raise DataError("a task's gradient is exactly zero (no trainable signal in its calibration batches)")
    cos = (stacked @ stacked.T) / torch.outer(norms, norms)
    cos = cos.clamp(-1.0, 1.0).numpy()
    np.fill_diagonal(cos, 1.0)
    return cos


# ------------------------------------------------------------------------ subset search


def combinations_array(n: int, size: int) -> np.ndarray:
    """All `size`-subsets of range(n) as rows, in lexicographic order, built without a Python
    loop over subsets (each step appends every larger element to every row)."""
    if size < 1 or size > n:
        return np.zeros((0, max(size, 0)), dtype=np.int64)
    combos = np.arange(n, dtype=np.int64)[:, None]
    for _ in range(size - 1):
        last = combos[:, -1]
        counts = n - 1 - last
        starts = np.cumsum(counts) - counts
        within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)
        new = np.repeat(last + 1, counts) + within
        combos = np.concatenate([np.repeat(combos, counts, axis=0), new[:, None]], axis=1)
    return combos


def _pair_sums(cos: np.ndarray, combos: np.ndarray) -> np.ndarray:
    total = np.zeros(len(combos), dtype=np.float64)
    for a in range(combos.shape[1]):
        for b in range(a + 1, combos.shape[1]):
            total += cos[combos[:, a], combos[:, b]]
    return total


def lowest_mean_cosine_subsets(cos: np.ndarray, size: int, top_k: int) -> list[tuple[float, tuple[int, ...]]]:
    """The `top_k` subsets of `size` tasks with the lowest mean pairwise cosine, exhaustively.

    For each first element i, every completion is an (size-1)-subset of {i+1..M-1}: a suffix of
    the lexicographic list of (size-1)-subsets, whose internal pair sums are computed once.
    Ties are broken by the subsets' indices, so the result is deterministic.
    """
    cos = np.asarray(cos, dtype=np.float64)
    m = cos.shape[0]
    if cos.shape != (m, m):
        raise ConfigError(f"cosine matrix must be square, got {cos.shape}")
    if not 2 <= size <= m:
        raise ConfigError(f"--size={size} must be between 2 and the pool size {m}")
    if top_k < 1:
        raise ConfigError(f"--top-k={top_k} must be >= 1")
    rest = combinations_array(m, size - 1)
    rest_sums = _pair_sums(cos, rest)
    firsts = rest[:, 0]
    n_pairs = size * (size - 1) // 2
    candidates: list[tuple[float, tuple[int, ...]]] = []
    for i in range(m - size + 1):
        start = int(np.searchsorted(firsts, i + 1))
        block = rest[start:]
        scores = rest_sums[start:] + cos[i, block].sum(axis=1)
        keep = min(top_k, len(scores))
        # argpartition gives the k lowest in any order; ties beyond the cut are settled below.
        cut = np.argpartition(scores, keep - 1)[:keep] if keep < len(scores) else np.arange(len(scores))
        threshold = scores[cut].max()
        for j in np.flatnonzero(scores <= threshold):
            candidates.append((float(scores[j]) / n_pairs, (i, *map(int, block[j]))))
    candidates.sort()
    return candidates[:top_k]


def brute_force_subsets(cos: np.ndarray, size: int, top_k: int) -> list[tuple[float, tuple[int, ...]]]:
    """Reference implementation (itertools; slow): used by the tests to check the search."""
    from itertools import combinations

    n_pairs = size * (size - 1) // 2
    scored = [
        (sum(cos[a, b] for a, b in combinations(subset, 2)) / n_pairs, subset)
        for subset in combinations(range(cos.shape[0]), size)
    ]
    scored.sort()
    return scored[:top_k]


# ------------------------------------------------------------------------ ordering

ORDER_RULES = ("greedy", "given")


def order_subset(subset: Sequence[int], cos: np.ndarray, rule: str) -> list[int]:
    """Training order of a mined subset (indices into the pool)."""
    if rule == "given":
        return sorted(subset)
    if rule != "greedy":
        raise ConfigError(f"--order={rule!r} is invalid; valid: {', '.join(ORDER_RULES)}")
    remaining = sorted(subset)

    def mean_cos(t: int, others: Sequence[int]) -> float:
        return float(np.mean([cos[t, u] for u in others if u != t]))

    # min() keeps the first (lowest pool index) on ties.
    first = min(remaining, key=lambda t: mean_cos(t, remaining))
    placed = [first]
    remaining.remove(first)
    while remaining:
        nxt = min(remaining, key=lambda t: mean_cos(t, placed))
        placed.append(nxt)
        remaining.remove(nxt)
    return placed


# ------------------------------------------------------------------------ outputs


def write_cosine_csv(path: Path, names: Sequence[str], cos: np.ndarray) -> None:
    lines = ["task," + ",".join(names)]
    lines += [name + "," + ",".join(f"{v:.6f}" for v in row) for name, row in zip(names, cos)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_cosine_csv(path: Path) -> tuple[list[str], np.ndarray]:
    rows = [line.split(",") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    names = rows[0][1:]
    return names, np.array([[float(v) for v in r[1:]] for r in rows[1:]], dtype=np.float64)


def short_name(task: str) -> str:
    return task.split("_", 1)[0]


def write_heatmap(path: Path, names: Sequence[str], cos: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = len(names)
    off = cos[~np.eye(m, dtype=bool)] if m > 1 else np.array([1.0])
    limit = max(float(np.abs(off).max()), 1e-6)
    size = max(4.0, 0.32 * m + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(cos, cmap="coolwarm", vmin=-limit, vmax=limit)
    labels = [short_name(n) for n in names]
    ax.set_xticks(range(m), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(m), labels, fontsize=7)
    if m <= 16:
        for i in range(m):
            for j in range(m):
                ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, label="gradient cosine")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sequence_yaml(
    name: str, family: str, tasks: Sequence[str], n_train: int | None, n_eval: int, header: Sequence[str]
) -> str:
    lines = [f"# {h}" for h in header]
    lines += [f"name: {name}", f"family: {family}", "tasks:"]
    lines += [f"  - {t}" for t in tasks]
    lines += [f"n_train: {'null' if n_train is None else n_train}", f"n_eval: {n_eval}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ gradients


def target_weights(model: torch.nn.Module, targets: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    weights = {
        name: module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets
    }
    if not weights:
        raise ConfigError(f"--target-modules={','.join(targets)} match no Linear layer of the model")
    return weights


def task_sketches(
    model,
    tokenizer,
    tasks,
    *,
    steps: int,
    batch_size: int,
    max_len: int,
    sketch_dim: int,
    seed: int,
    device: torch.device,
    targets: Sequence[str],
    offload: bool = False,
    log: Callable[[str], None] = print,
    prompt=None,
) -> tuple[list[GradientSketch], list[dict]]:
    """One sketch per task of the base model's mean training-loss gradient. `prompt` is the
    data.PromptFormat of the runs (default: the default config's, fixed date included)."""
    from .data.prompts import PromptFormat, TrainingEncoder
    from .initializers.capture import capture_gradients

    weights = target_weights(model, targets)
    encoder = TrainingEncoder(tokenizer, max_len, True, prompt if prompt is not None else PromptFormat())
    sketches, stats = [], []
    for task in tasks:
        batches = encoder.batches(task, steps, batch_size, seed, device)
        captured = capture_gradients(model, weights, batches, offload=offload)
        sketch = count_sketch(captured.grads, sketch_dim, seed)
        del captured.grads
        sketches.append(sketch)
        stats.append(
            {
                "task": task.name,
                "loss": captured.loss,
                "grad_norm": sketch.norm,
                "steps": captured.steps,
                "seconds": round(captured.seconds, 3),
            }
        )
        log(f"[mine] {task.name}: loss {captured.loss:.3f}, |g| {sketch.norm:.4g}, {captured.seconds:.1f}s")
    return sketches, stats


# ------------------------------------------------------------------------ CLI


def parse_pool(pool: str | None, pool_file: str | None) -> list[str]:
    names: list[str] = []
    if pool in NAMED_POOLS:
        names += NAMED_POOLS[pool]
    elif pool:
        names += [p.strip() for p in pool.split(",") if p.strip()]
    if pool_file:
        try:
            text = Path(pool_file).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"--pool-file={pool_file!r} cannot be read ({err.strerror})") from None
        names += [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]
    if not names:
        raise ConfigError("no pool given: pass --pool task1,task2,... or --pool-file FILE (one task per line)")
    return names


def load_pool(
    family: str, names: Sequence[str], root: str | None, n_eval: int, seed: int, skip_missing: bool, log=print
):
    """Tasks of the pool (resolved, de-duplicated) and the names that could not be loaded."""
    from .data.tasks import family_module

    module = family_module(family)
    resolve = getattr(module, "resolve_task_name", lambda n: n)
    tasks, missing, seen = [], {}, set()
    for raw in names:
        name = resolve(raw)
        if name in seen:
            continue
        seen.add(name)
        try:
            tasks.append(module.load_task(name, root=root, n_train=None, n_eval=n_eval, seed=seed))
        except DataError as err:
            missing[name] = str(err)
    if missing and not skip_missing:
        raise DataError(
            f"{len(missing)} pool task(s) not loadable: {', '.join(missing)} (pass --skip-missing to mine without them); "
            f"first error: {next(iter(missing.values()))}"
        )
    for name in missing:
        log(f"[mine] skipped (no data): {name}")
    return tasks, missing


def bench_search(pool_size: int = 46, size: int = 5, top_k: int = 10, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((pool_size, 64))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    cos = a @ a.T
    start = time.perf_counter()
    best = lowest_mean_cosine_subsets(cos, size, top_k)
    seconds = time.perf_counter() - start
    return {
        "pool": pool_size,
        "size": size,
        "subsets": math.comb(pool_size, size),
        "seconds": round(seconds, 3),
        "best_mean_cosine": round(best[0][0], 6),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cl_bench.mine",
        description="Mine task sequences with the most conflicting gradients (NI-Seq-Opposite).",
    )
    p.add_argument(
        "--pool",
        help=f"comma-separated task names (short SuperNI ids like task088 or 088 are accepted), or a named pool: {', '.join(NAMED_POOLS)}",
    )
    p.add_argument("--pool-file", help="file with one task name per line (# comments allowed)")
    p.add_argument("--family", default="superni", help="task family of the pool (default: superni)")
    p.add_argument(
        "--data-root", default=os.environ.get("CL_BENCH_DATA"), help="data.root (default: env CL_BENCH_DATA)"
    )
    p.add_argument("--size", type=int, default=5, help="tasks per sequence (default 5)")
    p.add_argument("--top-k", type=int, default=10, help="how many sequences to write (default 10)")
    p.add_argument("--out", help="output folder")
    p.add_argument(
        "--model",
        default="tiny",
        help="a conf/model choice (tiny: the embedded model, smollm2, ...) or a model path / Hub name",
    )
    p.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--order", default="greedy", choices=ORDER_RULES, help="order inside a sequence (default greedy)")
    p.add_argument("--steps", type=int, default=4, help="calibration batches per task (SLICE authors: 4)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration batch size (SLICE authors: 4)")
    p.add_argument("--max-len", type=int, default=256, help="prompt+answer tokens per example")
    p.add_argument("--sketch-dim", type=int, default=1 << 18, help="CountSketch buckets (0 = exact full vectors)")
    p.add_argument("--target-modules", default=",".join(DEFAULT_TARGETS), help="Linear layers whose gradients count")
    p.add_argument("--offload", action="store_true", help="accumulate captured gradients on the CPU")
    p.add_argument(
        "--n-train", type=int, default=None, help="n_train written into the sequence YAMLs (default null = all)"
    )
    p.add_argument(
        "--n-eval",
        type=int,
        default=200,
        help="held-out eval size: calibration data come only from the rest; written into the YAMLs",
    )
    p.add_argument("--name-prefix", default="ni_mined", help="sequence name prefix (default ni_mined)")
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="mine without pool tasks whose data is missing (listed in mining.json)",
    )
    p.add_argument(
        "--prompt-format", default="chat_template", help="chat_template | slice_paper (as evaluation.prompt.format)"
    )
    p.add_argument(
        "--system", default=None, help="system message of every prompt (as evaluation.prompt.system; default none)"
    )
    p.add_argument(
        "--date-string",
        default=None,
        help="date chat templates print (as evaluation.prompt.date_string; default 26 Jul 2024)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--cache-dir",
        default=os.environ.get("CL_BENCH_CACHE", str(Path.home() / ".cache" / "cl_bench")),
        help="where the tiny model is built",
    )
    p.add_argument(
        "--bench", action="store_true", help="only time the exhaustive C(46,5) search on a random 46x46 matrix"
    )
    return p


def _check_args(args) -> None:
    for key in ("size", "top_k", "steps", "batch_size", "max_len", "n_eval"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")
    if args.n_train is not None and args.n_train < 1:
        raise ConfigError(f"--n-train={args.n_train} must be >= 1")
    if not args.out:
        raise ConfigError("--out DIR is required (where cosine.csv, cosine.png and the sequence YAMLs go)")


def mine(args, log: Callable[[str], None] = print) -> dict:
    from omegaconf import OmegaConf

    from .data.models import load_model, resolve_device
    from .data.prompts import DEFAULT_DATE_STRING, PromptFormat

    _check_args(args)
    prompt = PromptFormat(
        format=args.prompt_format, system=args.system, date_string=args.date_string or DEFAULT_DATE_STRING
    )
    names = parse_pool(args.pool, args.pool_file)
    tasks, missing = load_pool(args.family, names, args.data_root, args.n_eval, args.seed, args.skip_missing, log)
    if len(tasks) < args.size:
        raise DataError(f"only {len(tasks)} pool task(s) have data but --size={args.size}; add tasks or lower --size")
    device = resolve_device(args.device)
    model_cfg = model_config(args.model, args.dtype)
    model, tokenizer = load_model(OmegaConf.create(model_cfg), device, cache_dir=args.cache_dir, log=log)
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]

    start = time.perf_counter()
    sketches, stats = task_sketches(
        model,
        tokenizer,
        tasks,
        steps=args.steps,
        batch_size=args.batch_size,
        max_len=args.max_len,
        sketch_dim=args.sketch_dim,
        seed=args.seed,
        device=device,
        targets=targets,
        offload=args.offload,
        log=log,
        prompt=prompt,
    )
    gradient_seconds = time.perf_counter() - start
    pool_names = [t.name for t in tasks]
    cos = cosine_matrix(sketches)

    start = time.perf_counter()
    best = lowest_mean_cosine_subsets(cos, args.size, args.top_k)
    search_seconds = time.perf_counter() - start

    out = Path(args.out)
    (out / "sequences").mkdir(parents=True, exist_ok=True)
    write_cosine_csv(out / "cosine.csv", pool_names, cos)
    sketch_desc = (
        "exact (no sketch)" if args.sketch_dim == 0 else f"CountSketch, {args.sketch_dim} buckets, seed {args.seed}"
    )
    write_heatmap(out / "cosine.png", pool_names, cos, f"gradient cosine, {args.model}, {sketch_desc}")
    sequences = []
    for rank, (score, subset) in enumerate(best, start=1):
        ordered = [pool_names[i] for i in order_subset(subset, cos, args.order)]
        seq_name = f"{args.name_prefix}_{rank}"
        header = [
            f"Mined by cl_bench.mine: rank {rank} of {len(best)}, mean pairwise gradient cosine {score:+.4f}",
            f"pool of {len(pool_names)} {args.family} tasks, model {args.model}, {sketch_desc},",
            f"calibration {args.steps} x {args.batch_size} training examples per task, order rule: {args.order}",
        ]
        text = sequence_yaml(seq_name, args.family, ordered, args.n_train, args.n_eval, header)
        (out / "sequences" / f"{seq_name}.yaml").write_text(text, encoding="utf-8")
        sequences.append({"name": seq_name, "rank": rank, "mean_cosine": score, "tasks": ordered})
    summary = {
        "pool": pool_names,
        "missing": missing,
        "family": args.family,
        "model": args.model,
        "sketch": sketch_desc,
        "size": args.size,
        "top_k": args.top_k,
        "order": args.order,
        "calibration": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "max_len": args.max_len,
            "n_eval_held_out": args.n_eval,
            "seed": args.seed,
            "targets": targets,
            "prompt": prompt.as_dict(),
        },
        "tasks": stats,
        "sequences": sequences,
        "subsets_searched": math.comb(len(pool_names), args.size),
        "seconds": {"gradients": round(gradient_seconds, 3), "search": round(search_seconds, 3)},
    }
    (out / "mining.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    log(
        f"[mine] searched {summary['subsets_searched']} subsets in {search_seconds:.2f}s; best mean cosine {best[0][0]:+.4f}; wrote {out}"
    )
    return summary


def model_config(model: str, dtype: str) -> dict:
    """--model as the runner's `model` group: a choice of conf/model/ (tiny, smollm2, ...; its
    YAML, e.g. smollm2's GGUF file) or a model path / Hub name. `--dtype` other than auto wins."""
    from omegaconf import OmegaConf

    from .run.config import CONF_DIR

    preset = CONF_DIR / "model" / f"{model}.yaml"
    if "/" not in model and preset.is_file():
        cfg = OmegaConf.to_container(OmegaConf.load(preset))
    else:
        cfg = {"name_or_path": model}
    if dtype != "auto" or "dtype" not in cfg:
        cfg["dtype"] = dtype
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.bench:
            print(json.dumps(bench_search()))
            return 0
        mine(args)
    except CLBenchError as exc:
        print(f"cl_bench.mine: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

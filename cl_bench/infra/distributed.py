"""The one place that knows about ranks: data-parallel runs through torch.distributed.

`python -m cl_bench ...` is one process (`Dist()`: rank 0 of 1, every collective a no-op).
`torchrun --nproc-per-node N -m cl_bench distributed=ddp ...`, `accelerate launch -m cl_bench ...`
and SLURM tasks (srun / submitit with tasks_per_node > 1: the rendezvous comes from the SLURM
environment through submitit's TorchDistributedEnvironment) start N copies of the same job; each
calls `init_from_env()` (the process group: gloo on CPU, NCCL on CUDA) and the runner asks this
module for what differs by rank:

* training: each rank runs a disjoint, seeded share of every optimizer step's examples
  (`shard`), the model is wrapped in torch's DistributedDataParallel (`wrap`), the LM loss is
  divided by the trained tokens of the whole step (all-reduced) and multiplied by the world
  size, because DDP averages the ranks' gradients: the step's gradient is the single-process one
  up to float summation order; clipping runs on the all-reduced gradient, identical on every rank;
* gradient captures: each rank runs a share of the forward passes, the fp32 sums are
  all-reduced (`all_reduce_`); the init math then runs on identical inputs and rank 0's result is
  broadcast (`broadcast_`), so every rank holds bit-identical weights;
* evaluation: the single-process batches are dealt round-robin to the ranks and the predictions
  gathered in order (`gather`): every prediction comes from the same batch as in one process;
* files, W&B, GP/IP and the run-dir lock: rank 0 (`is_main`, `on_main`), with barriers.

`distributed=fsdp` (`sharded`) shards the frozen base instead of copying it to every rank: torch's
FSDP2 (`fully_shard`) on every transformer block (the model's `_no_split_modules`, the blocks
Accelerate's FSDP wraps) and on the root, bf16 parameters for compute on CUDA
(`shard_model`). The LoRA factors (added per stage, after sharding) stay whole on every rank and
their gradients are averaged over the ranks once per step (`average_gradients_`), as DDP would;
the base never gets a gradient. What changes with a sharded base:

* every target weight is a DTensor holding a block of rows on each rank; the fold, the fp32
  master and the model-state files work on that block (lora.local_rows), a full weight is
  gathered only where a method's math reads one module's W (lora.full_weight);
* every forward pass all-gathers each block's weights, so the ranks must run the same number of
  forward (and backward) passes: the training step, the gradient capture and evaluation pad a
  rank's short share with passes that count for nothing (`max_over_ranks`), generation runs
  until every rank is done (synced_gpus), and GP/IP run on every rank on the same requests;
* gradient captures read ∂L/∂W from the blocks' inputs and output gradients (capture.py), not
  from the sharded parameter;
* plug-ins that need a whole model copy or PEFT's own weight-rewriting init refuse at start
  (`check_plugins`: the plug-in's `sharded_weights` flag).

A rank that dies takes the job down: torchrun stops the other ranks and names the failed one; a
rank blocked in a collective with a dead peer raises DistributedError naming itself and the
operation. The process-group timeout (CL_BENCH_DIST_TIMEOUT_MIN, default 120) bounds how long
the other ranks wait for rank 0's general evaluation.
Hand-written glue, not a library's: Accelerate's prepare() would move the model, own the
optimizer and autocast, which the stage loop already does; DDP itself and the collectives are
torch's.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import CLBenchError, ConfigError

KINDS = ("none", "ddp", "fsdp")


class DistributedError(CLBenchError):
    """A collective failed: another rank died or the rendezvous broke."""


def launched_world_size(slurm: bool = True) -> int:
    """Processes the launcher started for this job (1 without a launcher). `slurm`: also count the
    tasks of a SLURM job step (srun, submitit's tasks_per_node x nodes); off where the job did not
    ask for distributed=ddp, since a plain `sbatch --ntasks N` script may run one process."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if slurm and "SLURM_NTASKS" in os.environ and "SLURM_JOB_ID" in os.environ and "SLURM_STEP_ID" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return 1


def init_from_env() -> None:
    """Join the launcher's process group (idempotent; nothing to do for one process)."""
    import torch.distributed as tdist

    if tdist.is_initialized() or launched_world_size() == 1 and "WORLD_SIZE" not in os.environ:
        return  # (torchrun --nproc-per-node 1 sets WORLD_SIZE=1: a one-rank group, the DDP path)
    if "RANK" not in os.environ:  # SLURM tasks: MASTER_ADDR/PORT, RANK, WORLD_SIZE from the SLURM environment
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = datetime.timedelta(minutes=float(os.environ.get("CL_BENCH_DIST_TIMEOUT_MIN", 120)))
    tdist.init_process_group(backend, timeout=timeout)


class Dist:
    """Rank, world size and the collectives the runner needs; one process by default."""

    def __init__(self, kind: str = "none"):
        import torch.distributed as tdist

        self.kind = kind
        self.on = kind != "none" and tdist.is_available() and tdist.is_initialized()
        self.rank = tdist.get_rank() if self.on else 0
        self.world = tdist.get_world_size() if self.on else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0)) if self.on else 0
        self.backend = tdist.get_backend() if self.on else None

    @classmethod
    def from_config(cls, dcfg) -> Dist:
        """`distributed` config group -> Dist; ConfigError when it disagrees with the launch."""
        kind = str((dcfg or {}).get("kind", "none"))
        if kind not in KINDS:
            raise ConfigError(f"distributed.kind={kind!r} is invalid; valid: {', '.join(KINDS)}")
        world = launched_world_size(slurm=kind != "none")
        if kind == "none" and world > 1:
            raise ConfigError(
                f"launched as {world} processes but distributed=none; add distributed=ddp (or fsdp) "
                "(or start one process: python -m cl_bench ...)"
            )
        if kind == "fsdp" and world == 1 and "WORLD_SIZE" not in os.environ:
            # A one-process start would run unsharded and run out of memory where sharding was the point
            # (accelerate launch without --multi_gpu starts one process).
            raise ConfigError(
                "distributed=fsdp was started as one process, so nothing would be sharded; launch N processes "
                "(torchrun --nproc-per-node N, accelerate launch --multi_gpu --num_processes N, or SLURM tasks) "
                "or use distributed=none"
            )
        if kind != "none":
            init_from_env()
        return cls(kind)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """The base weights are FSDP shards (distributed=fsdp, any world size)."""
        return self.on and self.kind == "fsdp"

    def check_plugins(self, plugins: dict[str, Any], cfg) -> None:
        """ConfigError naming the first plug-in that cannot run on sharded base weights."""
        if not self.sharded:
            return
        for group, plugin in plugins.items():
            if not getattr(plugin, "sharded_weights", False):
                choice = cfg[group].get("_target_", "?").rsplit(".", 1)[-1]
                raise ConfigError(
                    f"{group}={getattr(plugin, 'name', choice)} does not run with distributed=fsdp (it needs whole base "
                    "weights or a whole model copy); use distributed=ddp, or with fsdp: initializer=vanilla|lora_ga|slice|"
                    "loram|milora, any regularizer, merge=absorb or a task-vector merge with merge.train_on=merged"
                )

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: cuda:LOCAL_RANK when the job asked for CUDA."""
        if self.on and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    # ---- work splitting --------------------------------------------------------------------
    def shard(self, items: Sequence) -> list:
        """This rank's share: items rank, rank + world, ... (disjoint; together all items)."""
        return list(items[self.rank :: self.world])

    def check_step_size(self, examples_per_step: int) -> None:
        if examples_per_step < self.world:
            raise ConfigError(
                f"trainer.batch_size x trainer.grad_accum = {examples_per_step} examples per step cannot "
                f"give each of {self.world} ranks one; raise trainer.batch_size or use fewer processes"
            )

    # ---- collectives (no-ops for one process) ----------------------------------------------
    def _call(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError) as exc:  # gloo/NCCL report a dead peer as RuntimeError
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed ({str(exc).splitlines()[0]}); "
                "another rank probably died: see its error above, then rerun the same command to resume"
            ) from None

    def barrier(self, what: str = "barrier") -> None:
        if self.on:
            import torch.distributed as tdist

            self._call(what, tdist.barrier)

    def all_reduce_(self, tensors: Sequence[torch.Tensor], what: str = "all-reduce", op: str = "sum") -> None:
        """Sum (op="max": maximum) each tensor over the ranks, in place (CPU tensors take a device
        trip under NCCL)."""
        if not self.on:
            return
        import torch.distributed as tdist

        reduce_op = tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM
        for t in tensors:
            if self.backend == "nccl" and t.device.type == "cpu":
                moved = t.cuda()
                self._call(what, tdist.all_reduce, moved, reduce_op)
                t.copy_(moved.cpu())
            else:
                self._call(what, tdist.all_reduce, t, reduce_op)

    def max_over_ranks(self, n: int, what: str) -> int:
        """The largest `n` of any rank (`n` itself for one process)."""
        if not self.on:
            return int(n)
        box = torch.tensor([int(n)], dtype=torch.int64)
        self.all_reduce_([box], what, op="max")
        return int(box.item())

    # ---- a training step's rank arithmetic (world 1: the value itself, no collective) ------
    def step_token_count(self, n: int, device: torch.device, what: str) -> int | torch.Tensor:
        """The whole step's trained tokens, the loss divisor every rank shares: the sum of the ranks'
        `n` as a 0-d int64 tensor on `device` (no host sync), or `n` itself for one process."""
        if self.world <= 1:
            return n
        total = torch.tensor(n, device=device if self.backend == "nccl" else "cpu")
        self.all_reduce_([total], what)
        return total.to(device)

    def all_finite(self, finite: torch.Tensor, what: str) -> torch.Tensor:
        """0-d bool: `finite` (this rank's flag, on the device) holds on every rank, so every rank
        skips (or takes) the same steps; `finite` itself for one process."""
        if self.world <= 1:
            return finite
        flags = finite.float()
        self.all_reduce_([flags], what)
        return flags == self.world

    def padding_passes(self, n: int, what: str) -> int:
        """Passes this rank adds to its `n` forward passes to run as many as the busiest rank: with
        a sharded base every forward pass is collective. 0 for any other kind and for one process."""
        if not self.sharded or self.world <= 1:
            return 0
        return self.max_over_ranks(n, what) - int(n)

    def sum_or_mean(self, values: torch.Tensor, mean: Sequence[bool], what: str) -> torch.Tensor:
        """1-d `values` over the ranks in one all-reduce (in place): entry i is the ranks' mean where
        `mean[i]`, else their sum. `values` itself for one process."""
        if self.world <= 1:
            return values
        self.all_reduce_([values], what)
        return torch.where(torch.tensor(list(mean)).to(values.device), values / self.world, values)

    def summed_counts(self, counts: dict[str, int], what: str) -> dict[str, int]:
        """Each integer count summed over the ranks (what all ranks ran together); `counts` itself
        for one process. Exact below 2**53 (summed as float64)."""
        if self.world <= 1:
            return counts
        summed = torch.tensor([counts[k] for k in counts], dtype=torch.float64)
        self.all_reduce_([summed], what)
        return dict(zip(counts, (int(v) for v in summed.tolist())))

    @torch.no_grad()
    def average_gradients_(self, params: Sequence[torch.nn.Parameter], what: str) -> None:
        """p.grad ← the mean of p.grad over the ranks, for every parameter (one flat all-reduce;
        a rank whose passes gave p no gradient adds zeros). The sharded path's DDP: FSDP leaves the
        whole-on-every-rank LoRA factors alone."""
        if not self.on or not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).float() for p in params])
        self.all_reduce_([flat], what)
        flat /= self.world
        at = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[at : at + n].view_as(p.grad))
            at += n

    def broadcast_(self, tensors: Sequence[torch.Tensor], what: str = "broadcast") -> None:
        """Overwrite each tensor with rank 0's value, in place."""
        if not self.on:
            return
        import torch.distributed as tdist

        with torch.no_grad():
            for t in tensors:
                if self.backend == "nccl" and t.device.type == "cpu":
                    moved = t.cuda()
                    self._call(what, tdist.broadcast, moved, 0)
                    t.copy_(moved.cpu())
                else:
                    self._call(what, tdist.broadcast, t, 0)

    def broadcast_object(self, obj: Any, what: str = "broadcast") -> Any:
        """Rank 0's `obj` on every rank (picklable)."""
        if not self.on:
            return obj
        import torch.distributed as tdist

        box = [obj]
        self._call(what, tdist.broadcast_object_list, box, 0)
        return box[0]

    def gather(self, obj: Any, what: str = "gather") -> list:
        """[rank 0's obj, rank 1's obj, ...] on every rank."""
        if not self.on:
            return [obj]
        import torch.distributed as tdist

        out: list = [None] * self.world
        self._call(what, tdist.all_gather_object, out, obj)
        return out

    def on_main(self, fn: Callable[[], Any], what: str) -> Any:
        """Run `fn` on rank 0 only; every rank returns its result or raises its CLBenchError."""
        value, error = None, None
        if self.is_main:
            try:
                value = fn()
            except CLBenchError as exc:
                error = exc
        value, error = self.broadcast_object((value, error), what)
        if error is not None:
            raise error
        return value

    # ---- the training model ----------------------------------------------------------------
    def shard_model(self, model: torch.nn.Module, log=None) -> torch.nn.Module:
        """distributed=fsdp: FSDP2 full-shard of the (frozen) model, each transformer block a unit;
        the model itself for any other kind. Call once, on the freshly loaded model: on rank 0 with
        its weights, on the CPU; on the other ranks built on the meta device (models.load_model
        weights=False). FSDP moves rank 0's blocks to its device as it shards them, the other
        ranks allocate their shards empty, and rank 0's whole state dict is broadcast into every
        rank's shards (torch.distributed.checkpoint's set_model_state_dict, broadcast_from_rank0),
        buffers too: one CPU copy of the checkpoint per job, one whole block per device at most.

        Every parameter is frozen first: FSDP builds its shards with the flag they have then, and
        only the LoRA factors added later train. On CUDA the blocks compute in bf16
        (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)); on the CPU in the model's dtype."""
        if not self.sharded:
            return model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        whole = model.state_dict() if self.is_main else {}  # rank 0's CPU tensors, kept alive until broadcast
        model.requires_grad_(False)
        on_cuda = self.backend == "nccl"
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if on_cuda
            else MixedPrecisionPolicy()
        )
        blocks = set(getattr(model, "_no_split_modules", None) or ())
        units = [m for m in model.modules() if type(m).__name__ in blocks]
        for module in units:
            fully_shard(module, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        if not self.is_main:
            model.to_empty(device=torch.device("cuda", self.local_rank) if on_cuda else torch.device("cpu"))
        self._call(
            "broadcasting the model's weights",
            set_model_state_dict,
            model,
            whole,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
        del whole
        self.broadcast_(
            list(model.buffers()), "broadcasting the model's buffers"
        )  # e.g. rotary inv_freq (not in the state dict)
        if log is not None:
            log(
                f"fsdp: {len(units)} blocks ({', '.join(sorted(blocks)) or 'none: the whole model is one unit'}) "
                f"sharded over {self.world} ranks{', bf16 compute' if on_cuda else ''}"
            )
        return model

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """DistributedDataParallel over `model`'s trainable parameters (None for one process and for
        fsdp, whose LoRA gradients are averaged by `average_gradients_`).

        No start-up broadcast (init_sync=False): the runner broadcast the stage's weights after
        the init already, and a second copy of a frozen multi-GB base per stage buys nothing."""
        if not self.on or self.sharded:
            return None
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if next(model.parameters()).device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, init_sync=False, broadcast_buffers=False)

    @staticmethod
    def no_sync(wrapped: torch.nn.Module | None, last: bool):
        """DDP's no_sync for every forward pass of a step but the last (one all-reduce per step)."""
        return wrapped.no_sync() if wrapped is not None and not last else contextlib.nullcontext()

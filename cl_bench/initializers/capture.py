"""Full-weight gradient capture for the target Linear weights only.

Only the target weights require grad during the capture (everything else is frozen, so no
other gradient is ever materialised). Each weight's gradient is folded into a float32
accumulator by a post-accumulate hook as soon as backward produces it and then freed, so at
any time we hold the fp32 accumulators plus at most one module's transient gradient. The
accumulators can live on the CPU (`offload=True`) for models whose gradients do not fit next
to the weights. The result is the gradient of the mean loss over every trained token of all
capture batches together (SLICE Eq. 4 with the capture as one effective batch): each batch's
summed token loss is divided by the trained tokens of all batches, so 1 × 16, 2 × 8 and 4 × 4
examples give the same gradient, as in training.

The model runs in eval mode (dropout off): the capture estimates the loss gradient at the
current weights, and eval mode keeps it deterministic and therefore cacheable.

Speed: the examples of all capture batches are re-cut by length (train/layouts.regroup: no
forward pass holds more tokens than the largest given batch, far less padding), the LM head runs
only at trained positions (train/loss.causal_lm_loss), and the loss is read once at the end, not per
batch. None of it changes the result beyond float rounding.

Sharded base (distributed=fsdp): a sharded weight gets no gradient of its own (FSDP would
reduce-scatter it into the shards), so ∂L/∂W = Σ_tokens g_yᵀ·x is formed from each target
module's input x and output gradient g_y (weight_grads.py), in float32 — the same sum autograd
forms for a weight that requires grad. Every rank runs as many forward/backward
passes as the busiest (a short share repeats its last pass, times 0).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..infra.errors import DataError, TrainingError
from ..lora.weight_grads import HookedWeightGradients, weight_grad_hooks
from ..train.layouts import regroup
from ..train.loss import causal_lm_loss, logits_mask, trained_tokens


@dataclass
class Capture:
    grads: dict[str, torch.Tensor]  # module name -> token-mean gradient, float32, [d_out, d_in]
    steps: int  # batches
    loss: float  # mean training loss over the trained tokens of all capture batches
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def capture_gradients(
    model: torch.nn.Module,
    weights: Mapping[str, torch.nn.Parameter],
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    offload: bool = False,
    transposed: Iterable[str] = (),
    max_tokens: int | None = None,
    dist=None,
) -> Capture:
    """∂(mean token loss over all `batches`)/∂W for each weight in `weights` (float32).

    `transposed` names weights stored as [d_in, d_out] (Conv1D); their gradients are returned
    in [d_out, d_in] layout like all others. `max_tokens` caps rows·width of one forward pass
    (default: the largest given batch's): activation memory only, the result is the same.
    `dist` (distributed.Dist, data-parallel runs): each rank runs every world-th forward pass and
    the fp32 sums and the loss are all-reduced, so every rank returns the single-process gradient
    up to float summation order.
    """
    start = time.perf_counter()
    if dist is not None and dist.sharded:
        return _capture_sharded(
            model, weights, batches, offload=offload, transposed=set(transposed), max_tokens=max_tokens, dist=dist
        )
    batches = [{k: v.cpu() for k, v in b.items()} for b in batches]  # token ids: small
    n_items = sum(int(trained_tokens(b)) for b in batches)
    forwards = regroup(batches, max_tokens=max_tokens)
    n_forwards = len(forwards)
    if dist is not None and dist.world > 1:
        forwards = dist.shard(forwards)
    device = next(iter(weights.values())).device if weights else torch.device("cpu")
    transposed = set(transposed)
    store = {name: (torch.device("cpu") if offload else w.device) for name, w in weights.items()}
    acc: dict[str, torch.Tensor] = {}

    def fold(name: str, param_grad: torch.Tensor) -> None:
        grad = param_grad.detach().to(device=store[name], dtype=torch.float32)
        if name in acc:
            acc[name].add_(grad)
        else:
            # `.to` returns the grad itself when nothing converts; own a copy then.
            acc[name] = grad.clone() if grad is param_grad else grad

    was_training = model.training
    steps = 0
    try:
        model.eval()
        loss_sum = torch.zeros((), device=device)
        with weight_grad_hooks(model, weights, fold), torch.enable_grad():
            for micro in forwards:
                keep, targets = logits_mask(micro["labels"])
                batch = {k: v.to(device, non_blocking=True) for k, v in micro.items()}
                loss = causal_lm_loss(
                    model, batch, n_items, keep=keep, targets=targets
                )  # this pass's share of the mean
                loss.backward()
                loss_sum += loss.detach()
            steps = len(batches)
    finally:
        model.train(was_training)
    if steps == 0:
        raise DataError("gradient capture got no batches (capture_steps or the task's training split is empty)")
    if dist is not None and dist.world > 1:
        for name, w in weights.items():  # a rank whose share never reached a weight adds zeros
            if name not in acc:
                acc[name] = torch.zeros(w.shape, dtype=torch.float32, device=store[name])
        dist.all_reduce_([loss_sum, *(acc[name] for name in weights)], "all-reducing the captured gradients")
    loss = float(loss_sum)  # the one host sync of the capture
    if not math.isfinite(loss):
        raise TrainingError(f"gradient capture: the loss over {steps} capture batches is {loss}")
    grads = {}
    for name, w in weights.items():
        g = acc.pop(name, None)
        if g is None:  # the weight did not influence the loss
            g = torch.zeros(w.shape, dtype=torch.float32, device=store[name])
        grads[name] = g.T.contiguous() if name in transposed else g
    return Capture(grads, steps, loss, time.perf_counter() - start, {"forward_passes": n_forwards})


def _capture_sharded(
    model, weights, batches, *, offload: bool, transposed: set, max_tokens: int | None, dist
) -> Capture:
    """capture_gradients on a sharded base (see the module docstring): the same Capture, from module
    inputs and output gradients (weight_grads.py) instead of weight gradients."""
    start = time.perf_counter()
    batches = [{k: v.cpu() for k, v in b.items()} for b in batches]
    if not batches:
        raise DataError("gradient capture got no batches (capture_steps or the task's training split is empty)")
    n_items = sum(int(trained_tokens(b)) for b in batches)
    forwards = regroup(batches, max_tokens=max_tokens)
    n_forwards = len(forwards)
    filler = forwards[:1]  # what a rank with no share of its own runs to stay in step
    forwards = dist.shard(forwards)
    idle = dist.max_over_ranks(len(forwards), "counting the capture's passes") - len(forwards)
    filler = forwards[-1:] or filler
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    try:
        hooked = HookedWeightGradients(model, weights, transposed=transposed, device="cpu" if offload else None)
    except ValueError as exc:
        raise TrainingError(f"gradient capture: {exc}") from None
    try:
        with hooked, torch.enable_grad():
            for i, micro in enumerate([*forwards, *filler * idle]):
                keep, targets = logits_mask(micro["labels"])
                batch = {k: v.to(device, non_blocking=True) for k, v in micro.items()}
                loss = causal_lm_loss(model, batch, n_items, keep=keep, targets=targets)
                if i < len(forwards):
                    loss.backward()
                    loss_sum += loss.detach()
                else:  # a filler pass: every rank's FSDP gathers must match; it adds zeros
                    (loss * 0.0).backward()
    finally:
        model.train(was_training)
    grads = hooked.pop()
    dist.all_reduce_([loss_sum, *(grads[name] for name in weights)], "all-reducing the captured gradients")
    loss = float(loss_sum)
    if not math.isfinite(loss):
        raise TrainingError(f"gradient capture: the loss over {len(batches)} capture batches is {loss}")
    return Capture(grads, len(batches), loss, time.perf_counter() - start, {"forward_passes": n_forwards})

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
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from ..errors import DataError, TrainingError
from ..stage import trained_tokens


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
) -> Capture:
    """∂(mean token loss over all `batches`)/∂W for each weight in `weights` (float32).

    `transposed` names weights stored as [d_in, d_out] (Conv1D); their gradients are returned
    in [d_out, d_in] layout like all others.
    """
    start = time.perf_counter()
    batches = list(batches)
    n_items = sum(trained_tokens(b) for b in batches) if batches else 0
    transposed = set(transposed)
    store = {name: (torch.device("cpu") if offload else w.device) for name, w in weights.items()}
    acc: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def fold(param: torch.Tensor) -> None:
            grad = param.grad.detach().to(device=store[name], dtype=torch.float32)
            if name in acc:
                acc[name].add_(grad)
            else:
                # `.to` returns the grad itself when nothing converts; own a copy then.
                acc[name] = grad.clone() if grad is param.grad else grad
            param.grad = None

        return fold

    flags = {p: p.requires_grad for p in model.parameters()}
    target_ids = {id(w) for w in weights.values()}
    was_training = model.training
    handles = []
    steps, loss_sum = 0, 0.0
    try:
        for p in flags:
            p.requires_grad_(False)
        for name, w in weights.items():
            w.grad = None
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(make_hook(name)))
        model.eval()
        with torch.enable_grad():
            for batch in batches:
                loss = model(**batch, num_items_in_batch=n_items).loss  # this batch's share of the mean
                if not torch.isfinite(loss):
                    raise TrainingError(f"gradient capture: loss is {float(loss)} at capture step {steps + 1}")
                loss.backward()
                loss_sum += float(loss.detach())
                steps += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            if id(p) in target_ids:
                p.grad = None
        model.train(was_training)
    if steps == 0:
        raise DataError("gradient capture got no batches (capture_steps or the task's training split is empty)")
    grads = {}
    for name, w in weights.items():
        g = acc.pop(name, None)
        if g is None:  # the weight did not influence the loss
            g = torch.zeros(w.shape, dtype=torch.float32, device=store[name])
        grads[name] = g.T.contiguous() if name in transposed else g
    return Capture(grads, steps, loss_sum, time.perf_counter() - start)

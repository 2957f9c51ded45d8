"""Gradients ∂L/∂W of the target weights alone, as backward produces them: from the weights
themselves (`weight_grad_hooks`) or, for weights that get no .grad of their own, off their modules
(`HookedWeightGradients`).

Under distributed=fsdp a target weight is a row shard (DTensor): asking autograd for W.grad would
make FSDP reduce-scatter it into the shards and materialise gradients of the whole frozen base.
The same gradient is Σ_tokens g_yᵀ·x, from each module's input x and its output's gradient g_y —
the product autograd itself forms for W.grad — so a forward hook keeps x and a tensor hook on the
output adds g_yᵀ·x (float32, [d_out, d_in] for Linear and Conv1D alike) once backward reaches it.
Hand-written: neither torch nor FSDP offers a per-module weight gradient of a frozen sharded weight.
Used by the gradient capture (initializers/capture.py) and EWC's Fisher (regularizers/ewc.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch


@contextmanager
def weight_grad_hooks(
    model: torch.nn.Module, weights: Mapping[str, torch.nn.Parameter], on_grad: Callable[[str, torch.Tensor], None]
) -> Iterator[None]:
    """While active, only `weights` require grad (every other parameter of `model` is frozen) and as
    soon as backward has accumulated a weight's gradient, on_grad(name, grad) receives it and the
    weight's .grad is freed: at most one module's gradient exists beyond what on_grad keeps.
    On exit the requires_grad flags are restored and the weights' .grad cleared."""
    flags = {p: p.requires_grad for p in model.parameters()}
    handles = []

    def hook_for(name: str):
        def hook(param: torch.Tensor) -> None:
            on_grad(name, param.grad)
            param.grad = None

        return hook

    try:
        for p in flags:
            p.requires_grad_(False)
        for name, w in weights.items():
            w.grad = None
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(hook_for(name)))
        yield
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for w in weights.values():
            w.grad = None


class HookedWeightGradients:
    """Context manager: while active, backward passes add ∂L/∂W of every given weight into
    per-weight float32 buffers [d_out, d_in] on `device` (default: the weight's), which `pop`
    returns and clears.

    `weights`: module name -> the Parameter its module holds (matched by identity; raises
    ValueError if no module holds one); `transposed`: names whose module stores [d_in, d_out]
    (Conv1D). Meanwhile every parameter has requires_grad off (restored on exit) and the input
    embeddings' output requires grad, so backward reaches every module and no parameter gets a
    gradient. One forward call per module per pass is assumed (no activation checkpointing, whose
    recomputation would call the hooks twice).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        weights: Mapping[str, torch.nn.Parameter],
        *,
        transposed: Iterable[str] = (),
        device: torch.device | str | None = None,
    ):
        by_id = {id(w): name for name, w in weights.items()}
        self.modules = {by_id[id(m.weight)]: m for m in model.modules() if id(getattr(m, "weight", None)) in by_id}
        missing = sorted(set(weights) - set(self.modules))
        if missing:
            raise ValueError(f"no module holds the weight of {missing[:3]}")
        transposed = set(transposed)
        self.model = model
        self.buffers = {
            name: torch.zeros(
                tuple(w.shape)[::-1] if name in transposed else tuple(w.shape),
                dtype=torch.float32,
                device=device if device is not None else w.device,
            )
            for name, w in weights.items()
        }
        self._handles: list = []
        self._flags: dict[torch.nn.Parameter, bool] = {}

    def _hook(self, name: str):
        buffer = self.buffers[name]

        def forward_hook(module, args, output):
            if not output.requires_grad:
                return
            x = args[0].detach()

            def backward_hook(grad: torch.Tensor) -> None:
                g = grad.reshape(-1, grad.shape[-1]).float()
                buffer.add_((g.T @ x.reshape(-1, x.shape[-1]).float()).to(buffer.device))

            output.register_hook(backward_hook)

        return forward_hook

    def __enter__(self) -> HookedWeightGradients:
        self._flags = {p: p.requires_grad for p in self.model.parameters()}
        for p in self._flags:
            p.requires_grad_(False)
        embeddings = self.model.get_input_embeddings()
        self._handles = [embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True))]
        self._handles += [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        for p, flag in self._flags.items():
            p.requires_grad_(flag)
        return False

    def pop(self) -> dict[str, torch.Tensor]:
        """The gradients added since the last pop (copies), then zeroed."""
        out = {name: b.clone() for name, b in self.buffers.items()}
        for b in self.buffers.values():
            b.zero_()
        return out

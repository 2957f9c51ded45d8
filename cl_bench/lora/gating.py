"""Gated mixing of kept LoRA branches on a PEFT model (GainLoRA, Liang et al., NeurIPS 2025).

Every target layer ℓ computes

    y = W_ℓ·x + Σ_i g_i(prompt)·s_i·B_{i,ℓ}·A_{i,ℓ}·x,

one LoRA branch i per finished stage (a PEFT adapter each, kept side by side and all active), one
gate value g_i ∈ [0, 1] per branch and example, the same for every layer and every position.

Gate architecture (survey slides, Eqs. 23–25; details from the authors' T5 code):
    p_0 = Pool(Token(x))                         (23)  mean of the input token embeddings
    p_l = σ(G_{i,l}·p_{l-1}),  l = 1..L          (24)  L = 2, σ = SiLU, G_1: [h, d], G_2: [d, h], no bias
    g_i = f(G_{i,L+1}·p_L)                       (25)  G_{i,L+1} = the key k_i ∈ ℝ^d,
          f(a) = |2·sigmoid(4·a) − 1| = |tanh(2a)| on a = cos(k_i, p_L)   (the code normalises
          both vectors; f(0) = 0, so k_i ⟂ p_L gives g_i = 0 exactly, whatever the norms)
The paper's slides give G_{i,l} ∈ ℝ^{n×n}; the authors' code uses d → h → d (h = 100), as here.

Pooling: only the PROMPT's real tokens, in every path that calls the model. At generation the
gate must see what the model sees before answering, and training and scoring must give the same g
(teacher forcing would otherwise let the answer tokens choose their own branch, and lm-eval's
multiple choice would compare differently gated models). Which tokens are the prompt, in order:
  * `prompt_tokens(model, mask)` around the forward (the caller knows): the training loss and the
    gradient captures (train/loss.py: label −100 under trainer.mask_prompt=true; their forward
    carries no labels, only the positions whose logits are kept), lm-eval's loglikelihood
    requests (each row's context, never its continuation or right padding: harness.py);
  * a forward with `labels`: the tokens with label −100 and attention 1;
  * a forward with an attention mask or a KV cache but no labels: every real token (the prefill
    of generation, whose input is the prompt); decoding steps with a non-empty KV cache see one new token and reuse
    the gates of their prefill (computed once per `generate`, never re-pooled);
  * neither (a bare `model(ids)`): refused (RuntimeError), so a new path cannot pool an answer. Deviation from the authors' code: it divides
the masked sum by the padded length (the gate input then depends on how much padding the batch
has); we divide by the number of prompt tokens, so g does not depend on batching.

Mechanism (PEFT has no per-example adapter weights): a forward pre-hook on the transformers
model computes every gate once per forward from the pooled embeddings; a forward hook on each
branch's lora_B modules multiplies their output by that branch's g (PEFT adds
lora_B(lora_A(dropout(x)))·s to the base output, so this is exactly g·s·B·A·x). The gates live
in a `GatedBranches` module registered on the transformers model (its parameters are the
model's: the optimizer and the in-stage checkpoint see the trainable gate). Gates run in float32
with autocast off, so g on stored inputs stays 0 to float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..infra.errors import ConfigError
from .layers import lora_layers, unwrapped

BANK = "cl_bench_gates"  # attribute name of the GatedBranches module on the transformers model


# ------------------------------------------------------------------ pure pieces (Eqs. 23, 25)
def gate_activation(a: torch.Tensor) -> torch.Tensor:
    """f(a) = |2·sigmoid(4a) − 1| (authors' code), elementwise; maps [−1, 1] onto [0, tanh 2 ≈ 0.964]."""
    return (2.0 * torch.sigmoid(4.0 * a) - 1.0).abs()


def prompt_mask(attention_mask: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """[batch, seq] bool: the real tokens (attention 1) that are prompt (label −100; all, without labels).

    Raises ConfigError when labels are given and a row has no prompt token: the prompt is found
    through its masked labels, which needs trainer.mask_prompt=true.
    """
    mask = attention_mask.bool()
    if labels is None:
        return mask
    mask = mask & (labels == -100)
    if not bool(mask.any(dim=1).all()):
        raise ConfigError(
            "merge (gainlora): a training row has no prompt token with label -100; the gates pool the "
            "prompt and find it through its masked labels: set trainer.mask_prompt=true"
        )
    return mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [batch, seq, d] over the positions where mask [batch, seq] is true: [batch, d] float32
    (a row with no true position gives 0)."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return (x.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


def pooled_prompt(
    embeddings: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """p_0 = Pool(Token(x)) [batch, d] float32 (Eq. 23): mean input embedding of the prompt tokens."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        return masked_mean(embeddings(input_ids), prompt_mask(attention_mask, labels))


# ------------------------------------------------------------------ the gate (Eqs. 24, 25)
class Gate(nn.Module):
    """One task's gating module: hidden = G_1 [h, d], output = G_2 [d, h], key = G_3 [1, d] (no biases).

    forward(p0 [batch, d]) -> g [batch] float32. The three layers are Linear modules so that a
    forward pre-hook sees each one's input (p_0, p_1, p_2): the gate memory collects them.
    """

    def __init__(self, d: int, hidden_dim: int):
        super().__init__()
        self.hidden = nn.Linear(d, hidden_dim, bias=False)
        self.output = nn.Linear(hidden_dim, d, bias=False)
        self.key = nn.Linear(d, 1, bias=False)

    def features(self, p0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_1, p_2) of Eq. 24."""
        p1 = nn.functional.silu(self.hidden(p0))
        return p1, nn.functional.silu(self.output(p1))

    def forward(self, p0: torch.Tensor) -> torch.Tensor:
        _, p2 = self.features(p0)
        a = self.key(p2).squeeze(-1) / (self.key.weight.norm() * p2.norm(dim=-1)).clamp_min(1e-30)
        return gate_activation(a)

    @torch.no_grad()
    def reset_(self, generator: torch.Generator) -> Gate:
        """nn.Linear's default init (Kaiming-uniform, a = √5) for G_1, G_2, drawn from `generator`;
        the key uniform in [−1, 1]^d like the authors' prompt key."""
        for layer in (self.hidden, self.output):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        nn.init.uniform_(self.key.weight, -1.0, 1.0, generator=generator)
        return self


class GateInputs(nn.Module):
    """Runs one gate on the pooled prompt of a batch (no transformer forward): a `model` for
    representations.collect_input_grams, whose hooks on gate.hidden/output/key see p_0, p_1, p_2."""

    def __init__(self, embeddings: nn.Module, gate: nn.Module):
        super().__init__()
        self.embeddings, self.gate = embeddings, gate

    def forward(self, input_ids, attention_mask=None, labels=None) -> torch.Tensor:
        return self.gate(
            pooled_prompt(self.embeddings, input_ids, attention_mask, labels).to(self.gate.key.weight.device)
        )


# ------------------------------------------------------------------ gated forward on a PEFT model
def _cache_length(past_key_values) -> int:
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    return int(past_key_values[0][0].shape[-2])  # legacy tuple cache


class GatedBranches(nn.Module):
    """The gates of a model's kept branches and the hooks that apply them.

    gates: {gate name: module p0 [batch, d] -> g [batch]} (a Gate, or any such module in tests);
    branches: {adapter name: gate name}: several adapters may share a gate (GainLoRA's init
    companions). `values` holds the last forward's {gate name: g [batch]}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gates = nn.ModuleDict()
        self.branches: dict[str, str] = {}
        self.values: dict[str, torch.Tensor] | None = None
        self.prompt: torch.Tensor | None = None  # [batch, seq] bool set by `prompt_tokens`
        self._handles: dict[str, list] = {}

    @classmethod
    def of(cls, model: nn.Module) -> GatedBranches | None:
        return getattr(unwrapped(model), BANK, None)

    @classmethod
    def install(cls, model: nn.Module) -> GatedBranches:
        """The model's GatedBranches, registered (with its pre-hook) on first call."""
        base = unwrapped(model)
        bank = getattr(base, BANK, None)
        if bank is None:
            bank = cls()
            base.add_module(BANK, bank)
            base.register_forward_pre_hook(bank._compute, with_kwargs=True)
        return bank

    def add_gate(self, name: str, gate: nn.Module) -> None:
        if name in self.gates:
            raise ValueError(f"gate {name!r} exists already")
        self.gates[name] = gate

    def attach(self, model: nn.Module, adapter: str, gate: str) -> int:
        """Scale every lora_B output of `adapter` by gate `gate`'s value; returns the layers hooked."""
        if gate not in self.gates:
            raise ValueError(f"no gate {gate!r}; add it first")
        if adapter in self._handles:
            raise ValueError(f"adapter {adapter!r} is gated already")
        handles = []
        for name, layer in lora_layers(model, adapter).items():
            if adapter in getattr(layer, "lora_variant", {}):  # DoRA & co. rescale after B: g would not factor out
                raise ConfigError(
                    f"merge (gainlora): {name} adapter {adapter!r} is a LoRA variant; gates need plain LoRA"
                )
            handles.append(layer.lora_B[adapter].register_forward_hook(self._scale_hook(gate)))
        self.branches[adapter] = gate
        self._handles[adapter] = handles
        return len(handles)

    def _scale_hook(self, gate: str):
        def hook(module, args, out):
            if self.values is None or gate not in self.values:
                raise RuntimeError(f"gate {gate!r} has no value: the model's forward pre-hook did not run")
            g = self.values[gate]
            if g.shape[0] != out.shape[0]:
                raise RuntimeError(f"gate {gate!r}: {g.shape[0]} values for a batch of {out.shape[0]}")
            return out * g.view(-1, *([1] * (out.dim() - 1))).to(out.dtype)

        return hook

    def _compute(self, module, args, kwargs):
        """Forward pre-hook of the transformers model: every gate's g once per forward (see the module doc)."""
        if _cache_length(kwargs.get("past_key_values")) > 0:  # a decoding step: keep the prefill's gates
            ids = kwargs.get("input_ids", args[0] if args else None)
            batch = ids.shape[0] if ids is not None else kwargs["inputs_embeds"].shape[0]
            if self.values is None or any(v.shape[0] != batch for v in self.values.values()):
                raise RuntimeError("gates: a decoding step whose prefill did not compute them for this batch")
            return None
        if not self.gates:
            self.values = {}
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        with torch.no_grad():
            x = module.get_input_embeddings()(ids) if ids is not None else kwargs["inputs_embeds"].detach()
        self.values = self.gate_values(masked_mean(x, self._prompt_of(x, kwargs)))
        return None

    def _prompt_of(self, x: torch.Tensor, kwargs) -> torch.Tensor:
        """[batch, seq] bool: the prompt tokens of a forward's input x [batch, seq, d] (module doc)."""
        mask, labels = kwargs.get("attention_mask"), kwargs.get("labels")
        if self.prompt is not None:
            if tuple(self.prompt.shape) != tuple(x.shape[:2]):
                raise RuntimeError(f"gates: prompt mask {tuple(self.prompt.shape)} for an input {tuple(x.shape[:2])}")
            prompt = self.prompt.to(x.device).bool()
            return prompt & mask.bool() if mask is not None else prompt
        if mask is None and labels is None and kwargs.get("past_key_values") is None:
            # (transformers drops an all-ones mask from a generation prefill; it always has a cache)
            raise RuntimeError(
                "gates: a forward with neither attention_mask, labels, a KV cache (generation) nor "
                "prompt_tokens(): the gates cannot tell the prompt from the answer"
            )
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        return prompt_mask(mask, labels)

    def gate_values(self, p0: torch.Tensor) -> dict[str, torch.Tensor]:
        """{gate name: g [batch] float32} for pooled prompts p0 [batch, d]."""
        with torch.autocast(p0.device.type, enabled=False):
            return {name: gate(p0) for name, gate in self.gates.items()}


def gate_bank(model) -> GatedBranches | None:
    """The GatedBranches of `model` through torch.compile, DDP and PEFT wrappers (None: no gates)."""
    while hasattr(model, "_orig_mod") or (hasattr(model, "no_sync") and hasattr(model, "module")):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return GatedBranches.of(model)


@contextmanager
def prompt_tokens(model, mask: torch.Tensor | Callable[[], torch.Tensor]) -> Iterator[None]:
    """Inside the block the gates of `model` pool exactly the tokens of `mask` [batch, seq] (true =
    a prompt token; and'ed with the forward's attention mask), whatever the forward is given.
    `mask` may be a callable, called only when the model has gates. No gates: nothing happens."""
    bank = gate_bank(model)
    if bank is None or not bank.gates:
        yield
        return
    bank.prompt = mask() if callable(mask) else mask
    try:
        yield
    finally:
        bank.prompt = None

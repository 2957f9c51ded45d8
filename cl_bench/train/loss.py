"""The causal-LM loss over trained tokens only, shared by the trainer and the gradient capture."""

from __future__ import annotations

import torch

from ..data.prompts import Batch
from ..lora.gating import prompt_mask, prompt_tokens


def trained_tokens(batch: Batch) -> torch.Tensor:
    """Tokens a causal-LM loss is taken on: labels != -100 after the one-position shift (0-d).

    Summed over every batch of an optimizer step (or of a gradient capture) it is the
    `num_items_in_batch` that makes the loss a mean over tokens whatever the batch split.
    """
    return (batch["labels"][:, 1:] != -100).sum()


def logits_mask(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): keep[b, t] is True where position t predicts a trained token
    (labels[b, t+1] != -100); targets are those tokens, in keep's row-major order. Computed
    where `labels` lives (on the host for training batches: no device sync)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep, labels[:, 1:][keep[:, :-1]]


_LOGITS_TO_KEEP: dict[type, bool] = {}


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    import inspect

    base = model
    while hasattr(base, "get_base_model") or hasattr(base, "_orig_mod") or hasattr(base, "no_sync"):
        # PEFT wrapper, torch.compile wrapper, DistributedDataParallel
        base = (
            base._orig_mod
            if hasattr(base, "_orig_mod")
            else base.module
            if hasattr(base, "no_sync")
            else base.get_base_model()
        )
    kind = type(base)
    if kind not in _LOGITS_TO_KEEP:
        _LOGITS_TO_KEEP[kind] = "logits_to_keep" in inspect.signature(base.forward).parameters
    return _LOGITS_TO_KEEP[kind]


def causal_lm_loss(
    model: torch.nn.Module,
    batch: Batch,
    n_items,
    *,
    keep: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ token cross-entropy over the trained tokens of `batch` / n_items (0-d, fp32 logits),
    the loss HF's ForCausalLM computes with `num_items_in_batch=n_items`.

    The LM head and the softmax run only at the positions that predict a trained token
    (transformers' boolean `logits_to_keep`): with the prompt masked that skips most positions,
    and the [tokens, vocab] logits (2 GB in fp32 for 4096 tokens of Llama-3's vocabulary) shrink
    with them. Same numbers up to float rounding. Models whose forward has no `logits_to_keep`
    take HF's own loss. `keep`/`targets` (logits_mask) may be given to avoid recomputing them.
    Batch keys used: input_ids, labels, and attention_mask / position_ids when present.
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_items_in_batch")}
    # GainLoRA's gates pool the prompt (label -100): the forward below carries no labels
    with prompt_tokens(model, lambda: prompt_mask(_attention(batch), batch["labels"])):
        return _loss(model, inputs, batch["labels"], n_items, keep, targets)


def _attention(batch: Batch) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return mask if mask is not None else torch.ones_like(batch["input_ids"])


def _loss(model, inputs: Batch, labels: torch.Tensor, n_items, keep, targets) -> torch.Tensor:
    if not _accepts_logits_to_keep(model):
        return model(**inputs, labels=labels, num_items_in_batch=n_items, use_cache=False).loss
    if keep is None or targets is None:
        keep, targets = logits_mask(labels)
    # use_cache=False also lets transformers see packed rows (position_ids restarts, no mask).
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:  # a model that ignores a boolean mask
        return model(**inputs, labels=labels, num_items_in_batch=n_items, use_cache=False).loss
    targets = targets.to(logits.device)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / n_items

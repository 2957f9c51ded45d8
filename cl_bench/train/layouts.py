"""How the examples of one optimizer step become forward passes (micro-batches).

Every layout below gives the same step gradient, because the LM loss of each forward pass is its
summed token loss divided by the trained tokens of the WHOLE step (train/trainer.py, HF's
`num_items_in_batch`): only float summation order changes. So the layout is a speed and memory
choice, never a change of the training data or of the optimizer steps.

* ``pad``   the configured micro-batches (trainer.batch_size examples each, plus any replay
            examples), each right-padded to its longest example: the SLICE authors' recipe and
            HF Trainer's default. Kept as the reference.
* ``group`` the step's examples sorted by length and cut into micro-batches, each padded only to
            its own longest example; the cuts minimise (padded tokens + a fixed per-forward cost
            in tokens) under a cap on tokens per forward (`plan_groups`, an exact dynamic
            program). Same batch format as ``pad``.
* ``pack``  the step's examples concatenated into rows of at most `row_len` tokens (first-fit
            decreasing), each example restarting its position ids at 0, with no attention mask.
            transformers then builds a block-diagonal causal mask (SDPA, eager) or runs the
            varlen kernel (flash_attention_2), so no token attends across examples and each
            example sees the positions it would see alone. The first token of every example is
            never a target (as in an unpacked row, where the shift drops it).

HF Trainer's `group_by_length` is not offered: it changes which examples share a step (a
different training run), while the layouts here only change how one step is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.batching import plan_groups
from ..data.prompts import Encoded
from ..data.prompts import collate_training as collate_padded

LAYOUTS = ("pad", "group", "pack")
__all__ = ["LAYOUTS", "Layout", "collate_packed", "pack_rows", "plan_groups", "regroup"]


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: examples (longest first, ties by index) into rows of <= row_len
    tokens; an example longer than row_len gets a row of its own. Returns index lists per row."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)):
        n = int(lengths[i])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(row_len - n)
    return rows


def collate_packed(rows: Sequence[Sequence[Encoded]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of concatenated examples with per-example position ids and no attention mask.

    Each example keeps its own labels except the first, which becomes -100 (it would be predicted
    from the previous example's last token). The padding at the end of a short row is a segment
    of its own (positions 0, 1, ...), so it attends to nothing real and is never a target.
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            labels[r, at + 1 : at + n] = torch.tensor(e.labels[1:])
            pos[r, at : at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


@dataclass(frozen=True)
class Layout:
    """trainer.layout and its limits. max_tokens caps rows·width of one forward pass (None: the
    padded recipe's worst case, (batch_size + extra examples)·max_len, so no layout needs more
    activation memory);
    overhead_tokens is the fixed cost of one more forward pass, in tokens (group only)."""

    name: str = "group"
    max_tokens: int | None = None
    overhead_tokens: int = 256

    def __post_init__(self) -> None:
        if self.name not in LAYOUTS:
            raise ValueError(f"layout {self.name!r}; valid: {', '.join(LAYOUTS)}")

    def micro_batches(
        self, configured: Sequence[Sequence[Encoded]], pad_id: int, *, batch_size: int, max_len: int
    ) -> list[dict[str, torch.Tensor]]:
        """The forward passes of one step, from its configured micro-batches (host tensors)."""
        if self.name == "pad":
            return [collate_padded(m, pad_id) for m in configured if m]
        cap = self.max_tokens or max(batch_size, *map(len, configured)) * max_len  # pad's worst case
        flat = [e for m in configured for e in m]
        lengths = [len(e.input_ids) for e in flat]
        if self.name == "group":
            return [
                collate_padded([flat[i] for i in g], pad_id) for g in plan_groups(lengths, cap, self.overhead_tokens)
            ]
        rows = pack_rows(lengths, max_len)
        per_forward = max(1, cap // max_len)
        return [
            collate_packed([[flat[i] for i in row] for row in rows[k : k + per_forward]], pad_id)
            for k in range(0, len(rows), per_forward)
        ]


def regroup(
    batches: Sequence[dict[str, torch.Tensor]], overhead_tokens: int = 128, max_tokens: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches (input_ids, attention_mask, labels) re-cut by `plan_groups` with
    `max_tokens` (default: the largest input batch's rows·width) as the cap: the same examples,
    no more tokens per forward than before, less padding. Tensors come back on the device they came from. (The pad id is
    0: pads sit after every real token and are masked, so their value never matters.)"""
    if not batches:
        return []
    device = batches[0]["input_ids"].device
    rows: list[Encoded] = []
    cap = 1
    for b in batches:
        ids, mask, labels = (b[k].cpu() for k in ("input_ids", "attention_mask", "labels"))
        cap = max(cap, ids.numel())
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            if not bool(mask[r, :n].all()):
                raise ValueError("regroup needs right-padded batches")
            rows.append(Encoded(ids[r, :n].tolist(), labels[r, :n].tolist(), False))
    groups = plan_groups([len(e.input_ids) for e in rows], max_tokens or cap, overhead_tokens)
    return [{k: v.to(device) for k, v in collate_padded([rows[i] for i in g], 0).items()} for g in groups]

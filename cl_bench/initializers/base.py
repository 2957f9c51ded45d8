"""The initializer seam: how each stage's fresh LoRA adapter starts.

The runner, per stage:
  1. kwargs = init.lora_config_kwargs()                 # e.g. init_lora_weights="pissa"
  2. lora_config = LoraConfig(..., **kwargs)
     init.before_wrap(base_model, lora_config, ctx)     # e.g. PEFT's LoRA-GA / CorDA preprocessing
  3. peft_model = get_peft_model(base_model, lora_config)
  4. result = init.init(peft_model, ctx)                # (A, B) per module + stats
  5. the runner calls initializers.apply.apply_init(peft_model, result): it copies
     result.factors into the adapter and, if result.absorb, subtracts s·B·A from the base
     weight (s = the adapter's actual scaling), so the model's function is unchanged at t = 0.
Initializers never import each other or the runner.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..tasks.base import TaskData

# A batch as the training loop sees it: input_ids, attention_mask, labels (prompt masked).
Batch = dict[str, torch.Tensor]


@dataclass
class InitContext:
    stage: int  # 1-based
    current: TaskData
    previous: list[TaskData]  # tasks of stages 1..stage-1, in order
    rank: int
    alpha: float
    scaling: float  # s used by training, absorption and merging alike
    target_modules: list[str]
    device: torch.device
    seed: int
    # make_batches(task, n_batches, batch_size, seed) -> iterator over tokenized training
    # batches drawn only from task.train, on `device`.
    make_batches: Callable[[TaskData, int, int, int], Iterator[Batch]]
    cache_dir: str | None = None  # content-keyed cache of captures / inits; None = off
    log: Callable[[str], None] = print


@dataclass
class InitResult:
    # module name (as in peft_model.named_modules()) -> (A [r, d_in], B [d_out, r]).
    # None keeps whatever PEFT initialised.
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    absorb: bool = False
    stats: dict[str, Any] = field(default_factory=dict)  # goes to results.json stages[i].init


class Initializer:
    """Default: PEFT's own init (vanilla LoRA: Kaiming A, B = 0)."""

    name = "vanilla"

    def lora_config_kwargs(self) -> dict[str, Any]:
        return {}

    def before_wrap(self, model: torch.nn.Module, lora_config: Any, ctx: InitContext) -> None:
        return None

    def validate(self, module_shapes: dict[str, tuple[int, int]], rank: int) -> None:
        """Raise ConfigError before any work if this method cannot run on these shapes."""
        return None

    def init(self, peft_model: torch.nn.Module, ctx: InitContext) -> InitResult:
        return InitResult(stats={"method": self.name})

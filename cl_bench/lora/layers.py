"""LoRA layers of a model: the one target-layer walker, the one fold, the fp32 weight master.

Module names are always those of the *unwrapped* model (`model.layers.0.self_attn.q_proj`),
whether the model is currently PEFT-wrapped or not, so the history, the master and the saved
model state share one naming.

Every change of a target weight goes through `WeightMaster.fold_` (W ← W + Δ, Δ in
[d_out, d_in] float32, PEFT's fan_in_fan_out layout handled): initializer absorption
(Δ = −s·B0·A0), merges (Δ = s·B·A or a merged task vector) and resume.

Why a master: with model.dtype=bfloat16 a small Δ rounds away when W + Δ is cast back to bf16
(bf16 keeps 8 mantissa bits: an update smaller than ~2⁻⁹·|W| is lost entirely), so over stages
the model would drift from W0 + Σ τ_i. For every target weight that is not float32 the master
keeps an exact float32 copy; folds add Δ to the master and cast it once into the compute
weight. Memory: 4 bytes per target-weight element on the weight's device (Llama-3.2-3B with
all seven projections: 2.82 B elements, 11.3 GB) and the same again on disk in
model_state.safetensors; nothing for float32 models, whose weights are their own master. The
master is what is saved and restored, so a resumed run repeats the same arithmetic.

Sharded base (distributed=fsdp): a target weight is a DTensor whose rank holds a block of rows of
the stored layout (`local_rows`). Folds add that block of Δ to that block, the master is the
block's float32 copy and the saved model state is the block; Δ itself (from the LoRA factors,
whole on every rank) is computed whole, one module at a time. `full_weight` gathers one module's
W for the methods that read it (a collective: every rank calls it in the same order).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from ..infra.errors import ConfigError
from . import task_vectors as merges

if TYPE_CHECKING:  # peft is imported where it is used: config checks and --help stay fast
    from peft.tuners.lora.layer import Linear as LoraLinear


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside any PEFT wrapper (PeftModel -> LoraModel -> base model)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def lora_layers(model: torch.nn.Module, adapter: str) -> dict[str, LoraLinear]:
    """Every LoRA Linear that holds `adapter`, by its name in the unwrapped model.

    Raises ConfigError if a LoRA layer of another kind holds the adapter, or if none does.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers: dict[str, LoraLinear] = {}
    for name, module in unwrapped(model).named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
            if not isinstance(module, LoraLinear):
                raise ConfigError(
                    f"lora.target_modules: {name} is a {type(module).__name__}; cl_bench supports Linear targets only"
                )
            layers[name] = module
    if not layers:
        raise ConfigError(f"no LoRA layers with adapter {adapter!r} found; check lora.target_modules")
    return layers


def target_linears(model: torch.nn.Module, target_modules: Iterable[str]) -> dict[str, torch.nn.Linear]:
    """The (base) Linear of every target module, wrapped or not, by unwrapped-model name."""
    from peft.tuners.lora import LoraLayer

    targets = set(target_modules)
    out: dict[str, torch.nn.Linear] = {}
    for name, module in unwrapped(model).named_modules():
        if name.split(".")[-1] not in targets:
            continue
        if isinstance(module, LoraLayer):
            module = module.get_base_layer()
        if isinstance(module, torch.nn.Linear):
            out[name] = module
    return out


def tied_targets(model: torch.nn.Module, target_modules: Iterable[str]) -> list[str]:
    """Target Linears whose weight IS the input embedding matrix (a tied LM head: SmolLM2,
    Llama-3.2-1B/3B). A fold into such a weight would change the input embeddings too."""
    embeddings = getattr(unwrapped(model).get_input_embeddings(), "weight", None)
    return [n for n, lin in target_linears(model, target_modules).items() if lin.weight is embeddings]


def refuse_tied_targets(model: torch.nn.Module, target_modules: Iterable[str]) -> None:
    """ConfigError when a target shares its weight with the input embeddings (`tied_targets`):
    every fold (absorbed init, merge=absorb, task-vector merges) would also move the embedding
    of every token, a silent change of the model's input side."""
    tied = tied_targets(model, target_modules)
    if tied:
        leaf = tied[0].split(".")[-1]
        raise ConfigError(
            f"lora.target_modules includes {leaf}, whose weight is tied to the input embeddings "
            f"(tie_word_embeddings=true): folding a LoRA into it would change the embeddings too; "
            f"remove {leaf} from lora.target_modules"
        )


def base_weight(layer: LoraLinear) -> torch.Tensor:
    """The frozen base weight of a LoRA layer (the Parameter itself, possibly [d_in, d_out])."""
    return layer.get_base_layer().weight


def local_rows(weight: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """(this rank's block of `weight`, the rows of the whole weight it holds), as stored.

    A plain tensor is its own block (all rows). An FSDP2 DTensor sharded on dim 0 holds rows
    [k·c, min((k+1)·c, d)) on rank k of its mesh, c = ⌈d / world⌉ (torch.chunk's split, which
    FSDP2 uses); the block is a view: writing it writes the shard. Raises ValueError for any
    other placement."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        return weight, slice(None)
    placements = tuple(weight.placements)
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"a sharded weight placed as {placements}; cl_bench handles row shards (Shard(0)) only")
    local = weight.to_local()
    rows, world, rank = weight.shape[0], weight.device_mesh.size(), weight.device_mesh.get_local_rank()
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    stop = min(start + chunk, rows)
    if local.shape[0] != stop - start:
        raise ValueError(f"a shard of {local.shape[0]} rows where rows {start}:{stop} of {rows} were expected")
    return local, slice(start, stop)


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly sharded) weight, as stored. Sharded: an all-gather over
    the ranks (every rank must call it, in the same order); plain: the weight itself."""
    from torch.distributed.tensor import DTensor

    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def as_out_in(layer, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor in [d_out, d_in] layout (GPT-2 Conv1D stores it transposed)."""
    return tensor.T if getattr(layer, "fan_in_fan_out", False) else tensor


def module_shapes(layers: dict[str, LoraLinear]) -> dict[str, tuple[int, int]]:
    return {name: (layer.out_features, layer.in_features) for name, layer in layers.items()}


def add_adapter(model: torch.nn.Module, lora_config, adapter: str) -> torch.nn.Module:
    """`model` with a new trainable adapter named `adapter`: PEFT-wrap a plain model, or add the
    adapter beside the existing ones when the model stayed wrapped.

    The adapters that were active stay active and are frozen (requires_grad False): a merge that
    keeps branches (GainLoRA) leaves the model whose function the next stage starts from, so the
    initializer and every begin_stage see that function, and only the new adapter trains.
    """
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        kept = [a for a in model.base_model.active_adapters if a != adapter]
        model.add_adapter(adapter, lora_config)
        model.base_model.set_adapter([*kept, adapter])  # PEFT makes every listed adapter trainable ...
        for name in kept:  # ... the kept ones are part of the starting model, not trained
            set_adapter_trainable(model, name, False)
        return model
    return get_peft_model(model, lora_config, adapter_name=adapter)


@torch.no_grad()
def add_frozen_adapter(
    model: torch.nn.Module, lora_config, adapter: str, factors: Factors, scaling: dict[str, float]
) -> torch.nn.Module:
    """`model` with one more adapter holding the given (A, B) and s per module, active and frozen;
    the other adapters keep their activity and every parameter its requires_grad.

    For branch methods: GainLoRA rebuilds its kept branches on resume, and holds an absorbed init
    as a frozen branch of its own. Raises ValueError if the factors do not match the adapter's shapes.
    """
    from peft import PeftModel, get_peft_model

    if not isinstance(model, PeftModel):
        model = get_peft_model(model, lora_config, adapter_name=adapter)
    else:
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        active = [a for a in model.base_model.active_adapters if a != adapter]
        model.add_adapter(adapter, lora_config)  # PEFT freezes every non-LoRA parameter here ...
        model.base_model.set_adapter([*active, adapter])
        for n, p in model.named_parameters():  # ... and set_adapter unfreezes the listed adapters
            if n in grads:
                p.requires_grad_(grads[n])
    set_adapter_trainable(model, adapter, False)
    layers = lora_layers(model, adapter)
    if set(layers) != set(factors):
        raise ValueError(
            f"adapter {adapter!r}: factors for {len(factors)} modules, the model has {len(layers)} LoRA layers"
        )
    for name, (A, B) in factors.items():
        layer = layers[name]
        if tuple(A.shape) != tuple(layer.lora_A[adapter].weight.shape) or tuple(B.shape) != tuple(
            layer.lora_B[adapter].weight.shape
        ):
            raise ValueError(f"{name}: factors A{tuple(A.shape)} B{tuple(B.shape)} do not fit adapter {adapter!r}")
        layer.lora_A[adapter].weight.copy_(A)
        layer.lora_B[adapter].weight.copy_(B)
        layer.scaling[adapter] = float(scaling[name])
    return model


def set_adapter_trainable(model: torch.nn.Module, adapter: str, trainable: bool) -> None:
    """requires_grad of every LoRA factor of `adapter` (lora_A and lora_B of every layer)."""
    for layer in lora_layers(model, adapter).values():
        layer.lora_A[adapter].requires_grad_(trainable)
        layer.lora_B[adapter].requires_grad_(trainable)


def set_scaling(model: torch.nn.Module, adapter: str, convention: str) -> dict[str, float]:
    """Set every layer's s for `adapter` from stage.lora_scaling(its α, its r, convention).

    PEFT computes the same formula when it builds a layer; setting it from ours keeps one
    source of s for training, absorption and merging (a layer whose r or α an initializer
    changed, e.g. EVA's rank redistribution, gets the s of its own r and α). Returns s per module.
    """
    out = {}
    for name, layer in lora_layers(model, adapter).items():
        s = lora_scaling(layer.lora_alpha[adapter], layer.r[adapter], convention)
        layer.scaling[adapter] = s
        out[name] = s
    return out


def adapter_factors(model: torch.nn.Module, adapter: str) -> Factors:
    """(A, B) of `adapter` per module: detached float32 copies on the CPU."""
    return {
        name: (
            layer.lora_A[adapter].weight.detach().float().cpu().clone(),
            layer.lora_B[adapter].weight.detach().float().cpu().clone(),
        )
        for name, layer in lora_layers(model, adapter).items()
    }


class WeightMaster:
    """float32 masters of the low-precision target weights, by unwrapped-model module name.

    Built once per run from the freshly loaded model (`attach`), before anything is folded.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    @classmethod
    @torch.no_grad()
    def attach(cls, model: torch.nn.Module, target_modules: Iterable[str]) -> WeightMaster:
        """ConfigError for a target tied to the input embeddings (`refuse_tied_targets`)."""
        target_modules = list(target_modules)
        refuse_tied_targets(model, target_modules)
        master = cls()
        for name, linear in target_linears(model, target_modules).items():
            if linear.weight.dtype != torch.float32:
                master.tensors[name] = local_rows(linear.weight.detach())[0].float().clone()
        return master

    @torch.no_grad()
    def fold_(self, name: str, layer: torch.nn.Module, delta: torch.Tensor) -> None:
        """W ← W + Δ for the target `name` (`layer`: its LoRA layer or its Linear).

        Δ is [d_out, d_in], whole; it is added in float32 (to the master when there is one) and the
        result is cast once into W's dtype. A sharded W takes its own rows of Δ.
        """
        weight = layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight
        block, rows = local_rows(weight)
        delta = as_out_in(layer, delta.float())[rows].to(block.device)
        if name in self.tensors:
            master = self.tensors[name]
            master.add_(delta.to(master.device))
            block.copy_(master)
        else:
            block.copy_((block.float() + delta).to(block.dtype))

    def value(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The exact current value of a target weight (this rank's block when sharded): its
        master, or the weight itself."""
        return self.tensors[name] if name in self.tensors else local_rows(weight)[0]

    @torch.no_grad()
    def restore_(self, name: str, weight: torch.Tensor, saved: torch.Tensor) -> None:
        """Set a target weight (and its master) from a saved value (model_state.safetensors):
        the whole weight, or this rank's block of a sharded one (what `value` returned)."""
        block, rows = local_rows(weight)
        if saved.shape != block.shape:
            saved = saved[rows]
        if name in self.tensors:
            self.tensors[name] = saved.float().to(self.tensors[name].device).clone()
            block.copy_(self.tensors[name])
        else:
            block.copy_(saved)


@torch.no_grad()
def follow_peft_absorption_(model: torch.nn.Module, adapter: str, master: WeightMaster) -> None:
    """Bring the masters along after PEFT's own init (PiSSA, OLoRA, LoRA-GA, CorDA) did
    W ← cast(W − s·B0·A0) in the weight's dtype: each master subtracts s·B0·A0 in float32 and W
    is re-cast from it. Float32 weights (no master) already hold the result and are left alone."""
    for name, layer in lora_layers(model, adapter).items():
        if name in master.tensors:
            A0, B0 = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
            master.fold_(name, layer, -merges.lora_delta(A0, B0, float(layer.scaling[adapter])))


@torch.no_grad()
def fold_adapter_(model: torch.nn.Module, adapter: str, master: WeightMaster) -> None:
    """W ← W + s·B·A for every layer of `adapter` (the adapter itself is left in place)."""
    for name, layer in lora_layers(model, adapter).items():
        delta = merges.lora_delta(
            layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach(), float(layer.scaling[adapter])
        )
        master.fold_(name, layer, delta)


@torch.no_grad()
def apply_init(peft_model: torch.nn.Module, result, adapter: str, master: WeightMaster) -> dict:
    """Write an initializer's `result.factors` (initializers.base.InitResult) into the adapter
    and, if `result.absorb`, fold W ← W − s·B0·A0.

    s is the layer's scaling (set by set_scaling); the product is taken in float32 from the
    factors *as stored in the adapter* (after any dtype cast), so W + s·B0·A0 is the original
    function up to the final cast. Returns a small JSON summary (modules written, whether
    absorbed, ‖s·B0·A0‖_F over all modules).
    """
    factors, absorb = result.factors, bool(result.absorb)
    if factors is None:
        return {"modules": 0, "absorbed": False, "factors": "peft"}
    layers = lora_layers(peft_model, adapter)
    unknown = sorted(set(factors) - set(layers))
    if unknown:
        raise ValueError(f"initializer returned factors for modules without adapter {adapter!r}: {unknown[:3]}")
    delta_sq = 0.0
    for name, (A, B) in factors.items():
        layer = layers[name]
        lora_A = layer.lora_A[adapter].weight
        lora_B = layer.lora_B[adapter].weight
        if tuple(A.shape) != tuple(lora_A.shape) or tuple(B.shape) != tuple(lora_B.shape):
            raise ValueError(
                f"{name}: factor shapes A{tuple(A.shape)} B{tuple(B.shape)} do not match the adapter "
                f"A{tuple(lora_A.shape)} B{tuple(lora_B.shape)}"
            )
        lora_A.copy_(A)
        lora_B.copy_(B)
        if absorb:
            delta = merges.lora_delta(lora_A, lora_B, float(layer.scaling[adapter]))
            delta_sq += float(delta.double().pow(2).sum())
            master.fold_(name, layer, -delta)
    return {"modules": len(factors), "absorbed": bool(absorb), "delta_fro": math.sqrt(delta_sq)}


@torch.no_grad()
def replace_start_A_(
    model: torch.nn.Module, adapter: str, new_A: dict[str, torch.Tensor], master: WeightMaster, absorbed: bool
) -> dict:
    """Give `adapter` a new starting A per module (before its first step) without changing the model.

    For plug-ins that own the input-side factor (InfLoRA, GPM's projected start). When the stage's
    init was absorbed (W = W_prev − s·B0·A0), W ← W + s·B0·(A0 − A_new) keeps W + s·B0·A_new = W_prev
    (through the one fold); then the runner records (A_new, B0) as the absorbed init, because it
    reads the init after begin_stage. Without absorption nothing is folded: B0 = 0 for every such
    initializer we have (vanilla, EVA), so the function is unchanged anyway. Returns a small JSON
    summary: modules changed and ‖s·B0·(A0 − A_new)‖_F folded over all modules.
    """
    layers = lora_layers(model, adapter)
    folded_sq = 0.0
    for name, A_new in new_A.items():
        layer = layers[name]
        weight = layer.lora_A[adapter].weight
        if tuple(A_new.shape) != tuple(weight.shape):
            raise ValueError(f"{name}: new A {tuple(A_new.shape)} does not match the adapter's {tuple(weight.shape)}")
        if absorbed:
            B0 = layer.lora_B[adapter].weight.detach()
            A_cast = A_new.to(device=weight.device, dtype=weight.dtype)  # the A that will be used
            delta = merges.lora_delta(weight.detach(), B0, float(layer.scaling[adapter])) - merges.lora_delta(
                A_cast, B0, float(layer.scaling[adapter])
            )
            folded_sq += float(delta.double().pow(2).sum())
            master.fold_(name, layer, delta)
        weight.copy_(A_new)
    return {"modules": len(new_A), "absorbed": bool(absorbed), "refolded_fro": math.sqrt(folded_sq)}


Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, d_in], B [d_out, r])


SCALINGS = ("rslora", "standard")


def lora_scaling(alpha: float, r: int, convention: str) -> float:
    """The LoRA scaling s: α/√r (rsLoRA, Kalajdzievski 2023) or α/r (Hu et al. 2021).

    The one formula for s: the runner sets every adapter layer's `scaling` from it (so training,
    absorption and merging use the same value) and StageContext.scaling is its nominal value.
    Raises ValueError for an unknown convention.
    """
    if convention not in SCALINGS:
        raise ValueError(f"unknown LoRA scaling convention {convention!r}; valid: {', '.join(SCALINGS)}")
    return float(alpha) / (float(r) ** 0.5 if convention == "rslora" else float(r))


def validate_rank(shapes: dict[str, tuple[int, int]], rank: int, target_modules: list[str]) -> None:
    if not shapes:
        raise ConfigError(f"lora.target_modules={list(target_modules)} match no Linear layer of the model")
    name, (d_out, d_in) = min(shapes.items(), key=lambda kv: min(kv[1]))
    if rank > min(d_out, d_in):
        raise ConfigError(f"lora.r={rank} exceeds min(d_out, d_in)={min(d_out, d_in)} of module {name}; lower lora.r")

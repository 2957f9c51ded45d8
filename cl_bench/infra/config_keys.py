"""The one schema of every config key of every group: its type and valid values, and whether it
changes a run's results.

* `check_values(config)` checks every key the composed config holds against it before anything is
  loaded: a bad value is one ConfigError line "KEY=VALUE is invalid; valid: WHAT" (no traceback,
  however the value was typed: `trainer.weight_decay=abc`, `lora.alpha=true`, `seed=abc`).
* `result_changing(key, config)` says whether a key can change the numbers: a resume compares only
  those keys with the run dir's config (run/store.py), and the report groups runs into one
  experiment over them (report/collect.py). The others are speed, display, logging and path knobs
  that the README calls exact (or that change float rounding only, as data parallelism does):
  runs that differ only in them are the same experiment and may resume each other. `data.root` is
  one of them: what matters is the data it holds, compared by content (results.json `data`).

Keys of the plug-in groups (initializer, regularizer, merge) depend on the choice; they are looked up
by the group's `_target_`. `*` in a key matches one level (general_eval.benchmarks.<name>.gp).
A key the schema does not know (an addition with `+key=`) is not checked here and counts as
result-changing; tests/run/test_config_schema.py checks that every key of every conf/ YAML is here.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Key:
    """One key's type: kind "int" | "number" | "bool" | "text" | "choice" | "texts" | "map" |
    "fraction_or_count" | "auto_or_int" | "device"; bounds lo/hi (open or closed), choices,
    whether null is valid, and whether the key changes results (`result`)."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    null: bool = False
    result: bool = True

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.null
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if self.kind == "int":
            return isinstance(v, int) and not isinstance(v, bool) and self._in_range(v)
        if self.kind == "number":
            return number and self._in_range(v)
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "text":
            return isinstance(v, str)
        if self.kind == "choice":
            return any(v == c and type(v) is type(c) for c in self.choices)
        if self.kind == "texts":
            return (
                isinstance(v, (list, tuple))
                and all(isinstance(x, str) for x in v)
                and (self.lo is None or len(v) >= self.lo)
            )
        if self.kind == "map":
            return isinstance(v, Mapping)
        if self.kind == "fraction_or_count":
            return number and ((isinstance(v, int) and v >= 1) or (isinstance(v, float) and 0 < v <= 1))
        if self.kind == "auto_or_int":
            return v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
        if self.kind == "device":
            return isinstance(v, str) and (v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()))
        raise ValueError(f"unknown kind {self.kind!r}")

    def _in_range(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def valid(self) -> str:
        """What is valid, in words (the end of the error line)."""
        text = {
            "int": "an integer",
            "number": "a number",
            "bool": "true, false",
            "text": "a text",
            "texts": "a list of names",
            "map": "a mapping",
            "fraction_or_count": "an integer >= 1 (a count) or a number in (0, 1] (a fraction)",
            "auto_or_int": "auto or an integer >= 1",
            "device": "auto, cpu, cuda, cuda:N",
        }.get(self.kind)
        if self.kind == "choice":
            text = ", ".join(
                "null" if c is None else str(c).lower() if isinstance(c, bool) else str(c) for c in self.choices
            )
        elif self.kind in ("int", "number") and (self.lo is not None or self.hi is not None):
            text += " " + self._range_text()
        elif self.kind == "texts" and self.lo:
            text = "a non-empty list of names"
        return f"null or {text}" if self.null and self.kind != "choice" else text

    def _range_text(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def Int(lo=None, hi=None, null=False, result=True) -> Key:  # noqa: N802  (spelled like the type)
    return Key("int", lo, hi, null=null, result=result)


def Num(lo=None, hi=None, lo_open=False, hi_open=False, null=False, result=True) -> Key:  # noqa: N802
    return Key("number", lo, hi, lo_open, hi_open, null=null, result=result)


def Choice(*choices, result=True) -> Key:  # noqa: N802
    return Key("choice", choices=choices, null=None in choices, result=result)


def Of(kind: str, null=False, result=True, lo=None) -> Key:  # noqa: N802
    return Key(kind, lo=lo, null=null, result=result)


BOOL, TEXT, SEED = Of("bool"), Of("text"), Int()
POSITIVE, COUNT, THRESHOLD, INCREMENT = Int(1), Int(1, null=True), Num(0, 1), Num(0)
TRAIN_ON = Choice("sum", "merged")
SPEED = dict(result=False)  # exact (the README) or float rounding only: not result-changing

# Every key outside the plug-in groups, by dotted path.
KEYS: dict[str, Key] = {
    "seed": SEED,
    "mode": Choice("sequential", "multitask", "independent"),
    "device": Of("device"),
    "data.root": Of("text", null=True, result=False),  # the data it holds is compared by content
    "lora.r": POSITIVE,
    "lora.alpha": Num(0, lo_open=True),
    "lora.scaling": Choice("rslora", "standard"),
    "lora.dropout": Num(0, 1, hi_open=True),
    "lora.target_modules": Of("texts", lo=1),
    "cache.enabled": Of("bool", result=False),
    "cache.dir": Of("text", result=False),
    "cache.row0": Of("bool", result=False),  # a hit gives the same predictions (tested)
    "progress": Of("bool", result=False),
    "verbose": Of("bool", result=False),
    "threads": Int(1, null=True, result=False),
    "model.name_or_path": Of("text", null=True),
    "model.builder": Choice("tiny", None),  # null: load model.name_or_path as it is
    "model.dtype": Choice("auto", "float32", "bfloat16", "float16"),
    "model.trust_remote_code": BOOL,
    "model.attn_implementation": Choice("sdpa", "flash_attention_2", "eager", None, **SPEED),
    "model.gguf_package": Of("text", null=True),
    "model.gguf_file": Of("text", null=True),  # null: model.name_or_path is an HF folder or Hub name
    "model.install": Of("text", result=False),
    "trainer.lr": Num(0, 1, lo_open=True, hi_open=True),
    "trainer.weight_decay": Num(0),
    "trainer.warmup_ratio": Num(0, 1, hi_open=True),
    "trainer.epochs": POSITIVE,
    "trainer.max_steps": COUNT,
    "trainer.batch_size": POSITIVE,
    "trainer.grad_accum": POSITIVE,
    "trainer.max_grad_norm": Num(0, lo_open=True),
    "trainer.max_len": POSITIVE,
    "trainer.mask_prompt": BOOL,
    "trainer.autocast_bf16": BOOL,
    "trainer.checkpoint_every_steps": Int(0, **SPEED),
    "trainer.layout": Choice("pad", "group", "pack", **SPEED),
    "trainer.max_tokens_per_forward": Int(1, null=True, **SPEED),
    "trainer.forward_overhead_tokens": Int(0, **SPEED),
    "trainer.log_every_steps": Int(1, null=True, **SPEED),
    "trainer.fused_adamw": Of("bool", **SPEED),
    "trainer.compile": Of("bool", **SPEED),
    "trainer.gradient_checkpointing": Of("bool", **SPEED),
    "evaluation.batch_size": Int(1, **SPEED),
    "evaluation.max_batch_tokens": Of("auto_or_int", null=True, result=False),  # same predictions (tested)
    "evaluation.decode_step_tokens": Int(0, null=True, **SPEED),
    "evaluation.max_new_tokens": POSITIVE,
    "evaluation.reference_margin": Int(0, null=True, **SPEED),
    "evaluation.max_prompt_len": POSITIVE,
    "evaluation.limit": COUNT,
    "evaluation.full_matrix": BOOL,
    "evaluation.protocol": Choice("per_task", "slice_paper"),
    "evaluation.use_chat_template": BOOL,
    "evaluation.prompt.format": Choice("chat_template", "slice_paper"),
    "evaluation.prompt.system": Of("text", null=True),
    "evaluation.prompt.date_string": TEXT,
    "general_eval.when": Choice("stage0_and_final", "every_stage", "none"),
    "general_eval.batch_size": Of("auto_or_int", **SPEED),
    "general_eval.limit": COUNT,
    "general_eval.apply_chat_template": BOOL,
    "general_eval.fewshot_as_multiturn": BOOL,
    "general_eval.max_length": Int(16, null=True),
    "general_eval.fewshot_pool": POSITIVE,
    "general_eval.benchmarks": Of("map"),
    "general_eval.benchmarks.*": Of("map"),
    "general_eval.benchmarks.*.source": Choice("local_or_registry", "registry", "local", "synthetic"),
    "general_eval.benchmarks.*.gp": BOOL,
    "general_eval.benchmarks.*.ip": BOOL,
    "general_eval.benchmarks.*.shots": Int(0),
    "general_eval.benchmarks.*.limit": COUNT,
    "general_eval.benchmarks.*.task": Of("text", null=True),
    "general_eval.benchmarks.*.metric": TEXT,
    "general_eval.benchmarks.*.file": Of("text", null=True),
    "general_eval.benchmarks.*.generation_kwargs": Of("map"),
    "general_eval.benchmarks.*.generation_kwargs.max_gen_toks": POSITIVE,
    "logger.wandb": Of("bool", result=False),
    "logger.project": Of("text", null=True, result=False),
    "logger.entity": Of("text", null=True, result=False),
    "logger.mode": Choice("online", "offline", "disabled", result=False),
    "logger.group": Of("text", null=True, result=False),
    "logger.job_type": Of("text", null=True, result=False),
    "logger.name": Of("text", null=True, result=False),
    "logger.id": Of("text", null=True, result=False),
    "logger.tags": Of("texts", result=False),
    "distributed.kind": Choice("none", "ddp", "fsdp", result=False),  # float summation order only (README)
    "sequence.name": TEXT,
    "sequence.family": Choice("synthetic", "superni", "trace", "cl_benchmark"),
    "sequence.tasks": Of("texts", lo=1),
    "sequence.n_train": COUNT,
    "sequence.n_eval": POSITIVE,
    "sequence.metrics": Of("map"),
}

_CAPTURE = {
    "capture_steps": POSITIVE,
    "capture_batch_size": POSITIVE,
    "svd": Choice("randomized", "exact"),
    "niter": POSITIVE,
    "offload": Choice("none", "previous", "all", True, False, **SPEED),
    "capture_max_tokens": Int(1, null=True, **SPEED),
}
_MEMORY = {
    "threshold": THRESHOLD,
    "threshold_increment": INCREMENT,
    "criterion": Choice("energy", "covariance"),  # lora/linalg.CRITERIA
    "n_samples": POSITIVE,
    "batch_size": POSITIVE,
}

# Keys of the plug-in groups, by the choice's `_target_`.
PLUGIN_KEYS: dict[str, dict[str, Key]] = {
    "cl_bench.initializers.vanilla.Vanilla": {},
    "cl_bench.initializers.loram.LoRAM": {},
    "cl_bench.initializers.milora.MiLoRA": {},
    "cl_bench.initializers.peft_native.OLoRA": {},
    "cl_bench.initializers.peft_native.PiSSA": {"niter": COUNT},
    "cl_bench.initializers.gradient.LoraGA": {
        **_CAPTURE,
        "scale": Choice("variance_matched", "stable"),
        "stable_gamma": Num(0, lo_open=True),
    },
    "cl_bench.initializers.gradient.Slice": {
        **_CAPTURE,
        "c": Num(0, 1),
        "operator": Choice("pcgrad", "gradvac", "nullspace", "magnitude_preserving"),
        "scope": Choice("global", "per_module"),
        "threshold": Num(-1, 1),
        "nullspace_rank": COUNT,
        "prev_capture_steps": COUNT,
        "prev_capture_batch_size": COUNT,
        "prev_buffer": Of("fraction_or_count", null=True),
    },
    "cl_bench.initializers.peft_native.LoraGAPeft": {
        "direction": Choice("ArBr", "A2rBr", "ArB2r", "random"),
        "scale": Choice("stable", "weight_svd", "gd_scale", "unit"),
        "stable_gamma": POSITIVE,
        "capture_steps": POSITIVE,
        "capture_batch_size": POSITIVE,
    },
    "cl_bench.initializers.peft_native.EVA": {
        "rho": Num(1),
        "tau": Num(0, 1),
        "use_label_mask": BOOL,
        "whiten": BOOL,
        "adjust_scaling_factors": BOOL,
        "steps": POSITIVE,
        "batch_size": POSITIVE,
        "max_forward_passes": POSITIVE,
    },
    "cl_bench.initializers.peft_native.CorDA": {
        "method": Choice("ipm", "kpm"),
        "calibration": Choice("current", "previous"),
        "samples": POSITIVE,
    },
    "cl_bench.regularizers.base.Regularizer": {},
    "cl_bench.regularizers.ewc.EWC": {"lam": Num(0), "gamma": Num(0, 1), "fisher_samples": POSITIVE},
    "cl_bench.regularizers.gpm.GPM": {
        **_MEMORY,
        "project_init": BOOL,
        "project_update": BOOL,
        "rtol": Num(0, lo_open=True),
    },
    "cl_bench.regularizers.inflora.InfLoRA": {**_MEMORY, "design": Choice("auto", "project", "inputs")},
    "cl_bench.regularizers.o_lora.OLoRA": {"lambda_1": Num(0), "lambda_2": Num(0), "norm": Choice("abs", "fro_sq")},
    "cl_bench.regularizers.ps_loss.PSLoss": {
        "lam": Num(0, lo_open=True),
        "temperature": Num(0, lo_open=True),
        "terms": Choice("both", "magnitude", "sign"),
    },
    "cl_bench.regularizers.replay.Replay": {"buffer_size": Of("fraction_or_count"), "per_micro_batch": POSITIVE},
    "cl_bench.mergers.absorb.Absorb": {},
    "cl_bench.mergers.average.Average": {"train_on": TRAIN_ON},
    "cl_bench.mergers.magmax.MagMax": {"vectors": Choice("per_stage", "cumulative"), "train_on": TRAIN_ON},
    "cl_bench.mergers.task_arithmetic.TaskArithmetic": {"lam": Num(0, lo_open=True), "train_on": TRAIN_ON},
    "cl_bench.mergers.ties.Ties": {
        "density": Num(0, 1, lo_open=True),
        "lam": Num(0, lo_open=True),
        "sign": Choice("total", "frequency"),
        "train_on": TRAIN_ON,
    },
    "cl_bench.mergers.dare.Dare": {
        "p": Num(0, 1, hi_open=True),
        "lam": Num(0, lo_open=True),
        "combine": Choice("task_arithmetic", "ties"),
        "sign": Choice("total", "frequency"),
        "seed": SEED,
        "train_on": TRAIN_ON,
    },
    "cl_bench.mergers.gainlora.GainLoRA": {
        **_MEMORY,
        "hidden_dim": POSITIVE,
        "key_init": Choice("inputs", "random"),
    },
}
PLUGIN_GROUPS = ("initializer", "regularizer", "merge")


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for every key of a nested mapping (a mapping's own key listed too: an empty
    one is a value); lists are values."""
    out: dict[str, Any] = {}
    if isinstance(config, Mapping):
        for k, v in config.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping):
                out[key] = v
                out.update(flatten(v, key + "."))
            else:
                out[key] = v
    return out


def spec_of(key: str, config: Mapping[str, Any] | None = None) -> Key | None:
    """The schema entry of dotted `key` (None: unknown). Plug-in group keys need `config` (flat or
    nested) for the group's `_target_`."""
    head, _, rest = key.partition(".")
    if head in PLUGIN_GROUPS and rest:
        if rest == "_target_" or rest.startswith("_parts_."):
            return TEXT
        if rest == "_parts_":  # {name: _target_} of the plug-ins a composite regularizer is made of
            return Of("map")
        for target in _targets(config, head):  # a composite takes the keys of each of its parts
            if rest in PLUGIN_KEYS.get(target, {}):
                return PLUGIN_KEYS[target][rest]
        return None
    if key in KEYS:
        return KEYS[key]
    for pattern, spec in KEYS.items():
        if "*" in pattern and pattern.count(".") == key.count(".") and fnmatch.fnmatchcase(key, pattern):
            return spec
    return None


def _targets(config: Mapping[str, Any] | None, group: str) -> list[str]:
    """The group's `_target_`, then the `_target_` of each of its `_parts_` (config flat or nested)."""
    if not config:
        return []
    node = config.get(group)
    node = node if isinstance(node, Mapping) else {}
    target = config.get(f"{group}._target_", node.get("_target_"))
    parts = config.get(f"{group}._parts_", node.get("_parts_"))
    return [t for t in [target, *(parts.values() if isinstance(parts, Mapping) else [])] if isinstance(t, str)]


def result_changing(key: str, config: Mapping[str, Any] | None = None) -> bool:
    """Whether dotted `key` can change a run's results (unknown keys: yes)."""
    if key.split(".")[0] in ("progress", "verbose", "logger", "cache", "threads", "distributed"):
        return False  # whole groups of display, logging and launch knobs, whatever their keys
    spec = spec_of(key, config)
    return True if spec is None else spec.result


def check_values(config: Mapping[str, Any]) -> None:
    """ConfigError, one line, for the first key of the composed `config` (a nested dict) whose
    value the schema does not accept: "KEY=VALUE is invalid; valid: WHAT"."""
    for key, value in flatten(config).items():
        spec = spec_of(key, config)
        if spec is not None and not spec.ok(value):
            raise ConfigError(f"{key}={value!r} is invalid; valid: {spec.valid()}")

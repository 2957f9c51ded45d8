"""The run directory as a resume point: lock, config check, stage files, in-stage checkpoints.

`RunStore` is the one owner of a run dir: the runner and remerge read and write every file
below through it, and it alone applies the rank-0 rule (every rank holds the same values; rank 0
writes) and the pruning of older stages' model and plug-in states. The functions after it are
its file formats (tests use them on single files).

Layout:
  results.json                         single source of truth, rewritten atomically
  stages/stage_XX/stage.json           the stage's entry of results.json "stages" (before its "eval"
                                       seconds); with model_state it marks the stage trained
  stages/stage_XX/adapter.safetensors  trained LoRA factors of stage XX: "<module>.A", "<module>.B"
                                       (module = unwrapped-model name); metadata: stage, task,
                                       adapter name, s per module
  stages/stage_XX/init.safetensors     init factors (A0, B0) that were absorbed (when any)
  stages/stage_XX/<group>.safetensors  state_dict() of the initializer / regularizer / merge
                                       (tensors; other values as JSON metadata); only the latest kept
  stages/stage_XX/model_state.safetensors  target weights of the model the next stage trains on
                                       (their fp32 master for low-precision models; only the latest kept);
                                       distributed=fsdp: an index (metadata "shards": N, no tensors) and
                                       model_state.rank-KK-of-NN.safetensors, rank K's rows of each weight
  stages/stage_XX/checkpoint/          in-stage checkpoint (adapter, optimizer, scheduler, RNG, step,
                                       every plug-in's state), replaced as a set: written whole into
                                       checkpoint.partial/, then renamed into place (save_checkpoint)
  predictions/stage_XX/<task>.jsonl    one scored example per line
  general_eval/                        lm-eval's work files (GP/IP)
A variant of the run (remerge: `RunStore.variant("remerge-<tag>")`) writes results.<variant>.json,
predictions.<variant>/ and general_eval.<variant>/ beside these, and reads the same stages/.
From adapter + init the task vector τ = s·B·A − s·B0·A0 of every stage is recomputed exactly.
A damaged file (truncated by a full disk, emptied, not safetensors) is a one-line RunDirError naming
it and what to do, never a raw SafetensorError.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..infra.config_keys import flatten, result_changing
from ..infra.distributed import Dist
from ..infra.errors import ConfigError, RunDirError
from ..infra.files import atomic_save_tensors, atomic_write_json, write_jsonl
from ..infra.interrupt import critical
from ..lora.layers import Factors, WeightMaster, target_linears
from ..stage import PLUGIN_GROUPS, Plugin, StageRecord

T = TypeVar("T")
NEW_RUN_DIR = "the run cannot resume from it: restore the file or rerun with another hydra.run.dir"


def read_file(path: Path, read: Callable[[], T], fix: str = NEW_RUN_DIR) -> T:
    """`read()` of one run-dir file; a missing, truncated or malformed file is a RunDirError
    naming `path` and `fix` (what to do) instead of a traceback."""
    from safetensors import SafetensorError

    try:
        return read()
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        what = "is missing" if isinstance(exc, FileNotFoundError) else "is damaged or truncated"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunDirError(f"{path} {what} ({reason}); {fix}") from None


def load_tensors(path: Path, fix: str = NEW_RUN_DIR) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (RunDirError when it is damaged)."""
    from safetensors.torch import load_file

    return read_file(path, lambda: load_file(str(path)), fix)


def load_metadata(path: Path, fix: str = NEW_RUN_DIR) -> dict[str, str]:
    """The metadata of a safetensors file (RunDirError when it is damaged)."""
    from safetensors import safe_open

    def read() -> dict[str, str]:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})

    return read_file(path, read, fix)


class RunLock:
    """An exclusive flock on DIR/.lock; the OS releases it when the process dies, even on SIGKILL."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fh = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise ConfigError(
                f"run dir {self.path.parent} is in use by pid {holder}; wait for it or choose another hydra.run.dir"
            ) from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.fh:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()


def config_differences(old: dict, new: dict) -> list[str]:
    """The result-changing keys (infra/config_keys.result_changing) whose values differ."""
    # `mode` came after the first runs: a config without it is a sequential run
    old, new = {"mode": "sequential", **old}, {"mode": "sequential", **new}
    a = {k: v for k, v in _leaves(old).items() if result_changing(k, old)}
    b = {k: v for k, v in _leaves(new).items() if result_changing(k, new)}
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))


def _leaves(config: dict) -> dict[str, Any]:
    return {k: v for k, v in flatten(config).items() if not isinstance(v, dict) or not v}


class ConfigMismatch(ConfigError):
    """A run dir that holds a run of another config: `keys` differ (old and new values kept for the
    message a multirun gives, __main__.py)."""

    def __init__(self, run_dir: Path, keys: list[str], old: dict, new: dict):
        self.run_dir, self.keys = Path(run_dir), keys
        self.old, self.new = _leaves(old), _leaves(new)
        shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
        super().__init__(
            f"run dir {run_dir} holds a run with a different config (keys: {shown}); use another hydra.run.dir"
        )

    def changes(self, limit: int = 4) -> str:
        """'key: old -> new' for the first `limit` differing keys (plug-in classes by their name)."""

        def shown(config: dict, key: str) -> str:
            value = config.get(key, "<absent>")
            return value.rsplit(".", 1)[-1] if key.endswith("._target_") and isinstance(value, str) else str(value)

        more = f" and {len(self.keys) - limit} more" if len(self.keys) > limit else ""
        return ", ".join(f"{k}: {shown(self.old, k)} -> {shown(self.new, k)}" for k in self.keys[:limit]) + more


class StageFiles:
    def __init__(self, run_dir: Path, stage: int):
        self.dir = Path(run_dir) / "stages" / f"stage_{stage:02d}"
        self.adapter = self.dir / "adapter.safetensors"
        self.init = self.dir / "init.safetensors"
        self.model_state = self.dir / "model_state.safetensors"
        self.checkpoint = self.dir / "checkpoint"
        self.partial_checkpoint = self.dir / "checkpoint.partial"  # the next set, until complete

    def model_state_shard(self, rank: int, world: int) -> Path:
        """Rank `rank`'s rows of the target weights (distributed=fsdp)."""
        return self.dir / f"model_state.rank-{rank:02d}-of-{world:02d}.safetensors"

    def model_state_files(self) -> list[Path]:
        """The model state: the file (the index under fsdp) and any rank shards."""
        return [self.model_state, *sorted(self.dir.glob("model_state.rank-*.safetensors"))]

    def state(self, group: str) -> Path:
        """A plug-in group's state after this stage."""
        return self.dir / f"{group}.safetensors"

    @property
    def record(self) -> Path:
        """stage.json: the stage's entry of results.json "stages"."""
        return self.dir / "stage.json"


class RunStore:
    """Every read and write of one run dir (module doc), for the runner and remerge.

    `dist` (infra/distributed.Dist; one process by default): writes happen on rank 0 only, the
    other ranks skip them; the fsdp model state is the exception (every rank writes its rows).
    `variant` (e.g. "remerge-ties"): results, predictions and general-eval files of a variant
    of the run, beside the run's own; stage files are always the run's."""

    def __init__(self, run_dir: str | Path, dist: Dist | None = None, variant: str = ""):
        self.dir = Path(run_dir)
        self.dist = dist or Dist()
        self.variant = variant

    def variant_of(self, variant: str) -> RunStore:
        """The same run dir and ranks, writing the files of `variant`."""
        return RunStore(self.dir, self.dist, variant)

    def _named(self, stem: str, suffix: str = "") -> Path:
        return self.dir / (f"{stem}.{self.variant}{suffix}" if self.variant else f"{stem}{suffix}")

    @property
    def results_path(self) -> Path:
        return self._named("results", ".json")

    def stage(self, stage: int) -> StageFiles:
        return StageFiles(self.dir, stage)

    # ---- the run ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The run-dir lock (RunLock), held by rank 0; every rank gets its ConfigError if taken."""
        lock = RunLock(self.dir)
        self.dist.on_main(lambda: lock.__enter__() and None, "taking the run-dir lock")
        try:
            yield
        finally:
            lock.__exit__()

    def read_results(self) -> dict | None:
        """results.json as written (None when absent); ConfigError when it is not valid JSON."""
        path = self.results_path
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc.msg}); move it away to start afresh") from None

    def load_results(self, config: dict, data_fingerprint: str | None = None) -> dict | None:
        """results.json of an earlier run in this dir, after checking it holds the same config
        (the result-changing keys, infra/config_keys) and, when both record it, the same data by
        content (data.root may differ); ConfigMismatch naming the differing keys otherwise."""
        previous = self.read_results()
        if previous is None:
            return None
        diff = config_differences(previous.get("config", {}), config)
        if diff:
            raise ConfigMismatch(self.dir, diff, previous.get("config", {}), config)
        recorded = (previous.get("data") or {}).get("fingerprint")
        if recorded and data_fingerprint and recorded != data_fingerprint:
            was = (previous.get("data") or {}).get("root")
            raise ConfigError(
                f"run dir {self.dir} was trained on other data (data.root={was!r} then, other examples now); "
                "point data.root at the same data or use another hydra.run.dir"
            )
        return previous

    def save_results(self, results: dict, barrier: str | None = None) -> None:
        """results.json, atomically, by rank 0; with `barrier` (what for), every rank then waits
        until it is written."""
        if self.dist.is_main:
            atomic_write_json(self.results_path, results)
        if barrier:
            self.dist.barrier(barrier)

    # ---- finished stages -------------------------------------------------------------------
    def trained_through(self, done: int, n_stages: int) -> int:
        """The last stage whose model was trained and saved: `done` (stages in results.json), or
        done + 1 when a crash came during that stage's evaluation (its model state exists)."""
        return done + 1 if done < n_stages and self.stage(done + 1).model_state.exists() else done

    def read_stage(self, stage: int) -> dict[str, Any]:
        """stage.json of a trained stage (its results.json entry, before evaluation)."""
        path = self.stage(stage).record
        return read_file(path, lambda: json.loads(path.read_text()))

    def history(self, stages: int) -> list[StageRecord]:
        """StageRecords of stages 1..`stages` (factors read on first use)."""
        return [load_stage_record(self.stage(s)) for s in range(1, stages + 1)]

    def save_history(
        self, stage: int, task: str, adapter: str, trained: Factors, init: Factors | None, scaling: dict[str, float]
    ) -> None:
        """The stage's trained and absorbed-init factors and s (what history and remerge need)."""
        if self.dist.is_main:
            save_stage_record(self.stage(stage), stage, task, adapter, trained, init, scaling)

    def save_plugin_states(self, stage: int, plugins: dict[str, Plugin]) -> None:
        if self.dist.is_main:
            save_plugin_states(self.stage(stage).dir, plugins)

    def save_stage(self, stage: int, record: dict, model, targets: list[str], master: WeightMaster) -> None:
        """stage.json and the model state the next stage trains on (under fsdp every rank's rows,
        then the index); the in-stage checkpoint is dropped. Called by every rank."""
        files = self.stage(stage)
        if self.dist.sharded:  # every rank its rows, then the index that marks the state saved
            save_model_state(files, model, targets, master, shard=(self.dist.rank, self.dist.world))
            self.dist.barrier(f"saving the model state of stage {stage}")
        if not self.dist.is_main:
            return
        atomic_write_json(files.record, record)
        if self.dist.sharded:
            save_model_state_index(files, self.dist.world)
        else:
            save_model_state(files, model, targets, master)  # marks "trained": eval may be redone alone
        for folder in (files.checkpoint, files.partial_checkpoint, files.checkpoint.with_name("checkpoint.old")):
            shutil.rmtree(folder, ignore_errors=True)

    def restore_stage(
        self, stage: int, model, targets: list[str], master: WeightMaster, plugins: dict[str, Plugin]
    ) -> None:
        """The target weights and every plug-in's state as stage `stage` left them."""
        files = self.stage(stage)
        load_model_state(files, model, targets, master)
        load_plugin_states(files.dir, plugins)

    def prune(self, stage: int) -> None:
        """Only the latest model and plug-in states are needed to resume; older ones cost a model each."""
        if stage > 1 and self.dist.is_main:
            older = self.stage(stage - 1)
            for path in (*older.model_state_files(), *(older.state(g) for g in PLUGIN_GROUPS)):
                path.unlink(missing_ok=True)

    # ---- in-stage checkpoints --------------------------------------------------------------
    def checkpoint_writer(
        self, stage: int, model, plugins: dict[str, Plugin], init: Factors | None
    ) -> Callable[[Any, Any, Any], None]:
        """`write(state, optimizer, scheduler)`: the stage's in-stage checkpoint (save_checkpoint),
        with `init` as the absorbed init it started from; rank 0 writes, the others do nothing."""
        files = self.stage(stage)

        def write(state, optimizer, scheduler) -> None:
            if self.dist.is_main:
                save_checkpoint(files, model, state, optimizer, scheduler, plugins, init)

        return write

    def load_checkpoint(self, stage: int, model, plugins: dict[str, Plugin]) -> tuple[Any, dict] | None:
        """(TrainState, optimizer/scheduler state) of the stage's in-stage checkpoint, with the
        adapter, RNG and every plug-in's state put back; None without one."""
        files = self._settled(stage)
        resumed = load_checkpoint(files, model)
        if resumed:
            load_plugin_states(files.checkpoint, plugins, _restart(files))
        return resumed

    def checkpoint_init(self, stage: int) -> Factors | None:
        """The absorbed init the checkpointed stage started from; None without a complete
        checkpoint or when it holds none."""
        files = self._settled(stage)
        return load_checkpoint_init(files) if (files.checkpoint / "state.json").exists() else None

    def _settled(self, stage: int) -> StageFiles:
        """The stage's files after rank 0 settled its checkpoint (settle_checkpoint); every rank calls it."""
        files = self.stage(stage)
        if self.dist.is_main:
            settle_checkpoint(files)
        self.dist.barrier(f"settling the checkpoint of stage {stage}")
        return files

    # ---- evaluation outputs ----------------------------------------------------------------
    def predictions(self, stage: int) -> Path:
        return self._named("predictions") / f"stage_{stage:02d}"

    def save_predictions(self, stage: int, task: str, records: list[dict]) -> None:
        """One scored example per line (rank 0)."""
        if self.dist.is_main:
            write_jsonl(self.predictions(stage) / f"{task}.jsonl", records)

    def copy_predictions(self, stage: int, source: RunStore) -> None:
        """Row `stage`'s predictions of `source` (another variant of the run), where it has them."""
        if self.dist.is_main and source.predictions(stage).is_dir():
            shutil.copytree(source.predictions(stage), self.predictions(stage), dirs_exist_ok=True)

    @contextlib.contextmanager
    def general_work_dir(self) -> Iterator[str]:
        """Where this rank's lm-eval writes: general_eval/ on rank 0, a scratch folder removed
        afterwards on the others (under fsdp every rank runs the same requests)."""
        if self.dist.is_main:
            yield str(self._named("general_eval"))
            return
        with tempfile.TemporaryDirectory(prefix=f"cl_bench_rank{self.dist.rank}_") as scratch:
            yield scratch


def factors_to_tensors(factors: Factors) -> dict[str, torch.Tensor]:
    out = {}
    for name, (A, B) in factors.items():
        out[f"{name}.A"] = A
        out[f"{name}.B"] = B
    return out


def tensors_to_factors(tensors: dict[str, torch.Tensor]) -> Factors:
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return {n: (tensors[f"{n}.A"].float(), tensors[f"{n}.B"].float()) for n in names}


def save_stage_record(
    files: StageFiles,
    stage: int,
    task: str,
    adapter: str,
    trained: Factors,
    init: Factors | None,
    scaling: dict[str, float],
) -> None:
    """What the history and a remerge need of a stage: trained and absorbed-init factors, s."""
    meta = {"history": json.dumps({"stage": stage, "task": task, "adapter": adapter, "scaling": scaling})}
    if init is not None:
        atomic_save_tensors(files.init, factors_to_tensors(init))
    else:
        files.init.unlink(missing_ok=True)
    atomic_save_tensors(files.adapter, factors_to_tensors(trained), meta)


def load_stage_record(files: StageFiles) -> StageRecord:
    """The StageRecord of a finished stage; factors are read on first use."""
    meta = read_file(files.adapter, lambda: json.loads(load_metadata(files.adapter)["history"]))

    def load():
        trained = tensors_to_factors(load_tensors(files.adapter))
        init = tensors_to_factors(load_tensors(files.init)) if files.init.exists() else None
        return trained, init, {k: float(v) for k, v in meta["scaling"].items()}

    return StageRecord(meta["stage"], meta["task"], meta["adapter"], load)


def save_model_state(
    files: StageFiles, model, target_modules: list[str], master: WeightMaster, shard: tuple[int, int] | None = None
) -> None:
    """The target weights of `model` (their fp32 master where there is one).

    `shard` = (rank, world) under distributed=fsdp: this rank's rows go to its own file; once every
    rank has written, rank 0 calls `save_model_state_index` (the file that marks the state saved)."""
    tensors = {f"{n}.weight": master.value(n, lin.weight) for n, lin in target_linears(model, target_modules).items()}
    atomic_save_tensors(files.model_state_shard(*shard) if shard else files.model_state, tensors)


def save_model_state_index(files: StageFiles, world: int) -> None:
    atomic_save_tensors(files.model_state, {}, {"shards": str(world)})


@torch.no_grad()
def load_model_state(files: StageFiles, model, target_modules: list[str], master: WeightMaster) -> None:
    """Set the target weights from the saved state: whole weights, or the row shards of an fsdp run
    put back together (any number of ranks may resume either; each takes the rows it holds).
    Raises ConfigError if the files do not match the model's target modules or a shard is missing."""
    from safetensors import safe_open

    shards = read_file(files.model_state, lambda: int(load_metadata(files.model_state).get("shards", 0)))
    paths = [files.model_state_shard(k, shards) for k in range(shards)] or [files.model_state]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ConfigError(
            f"{files.model_state} was saved by {shards} ranks but {missing[0]} is missing; use another hydra.run.dir"
        )
    current = target_linears(model, target_modules)
    opened = [read_file(p, lambda p=p: safe_open(str(p), framework="pt")) for p in paths]
    for f, path in zip(opened, paths):
        if set(f.keys()) != {f"{n}.weight" for n in current}:
            raise ConfigError(f"{path} does not match the model's target modules; use another hydra.run.dir")
    for n, lin in current.items():  # one module at a time: the whole weight exists only briefly
        parts = [read_file(p, lambda f=f, n=n: f.get_tensor(f"{n}.weight")) for f, p in zip(opened, paths)]
        master.restore_(n, lin.weight, parts[0] if len(parts) == 1 else torch.cat(parts))


# ---- plug-in state -------------------------------------------------------------------------


def save_plugin_state(path: Path, state: dict[str, Any]) -> None:
    """Tensors into the safetensors body, every other value as JSON in its metadata."""
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    rest = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    try:
        meta = json.dumps(rest)
    except TypeError as exc:
        raise TypeError(f"plug-in state for {path.name}: non-tensor values must be JSON-serialisable ({exc})") from None
    atomic_save_tensors(path, tensors, {"state": meta})


def load_plugin_state(path: Path, fix: str = NEW_RUN_DIR) -> dict[str, Any]:
    state: dict[str, Any] = dict(load_tensors(path, fix))
    state.update(read_file(path, lambda: json.loads(load_metadata(path, fix).get("state", "{}")), fix))
    return state


def save_plugin_states(folder: Path, plugins: dict[str, Plugin]) -> None:
    """Every group's state_dict() to folder/<group>.safetensors (none written when empty)."""
    for group, plugin in plugins.items():
        path = Path(folder) / f"{group}.safetensors"
        state = plugin.state_dict()
        if state:
            save_plugin_state(path, state)
        else:
            path.unlink(missing_ok=True)


def load_plugin_states(folder: Path, plugins: dict[str, Plugin], fix: str = NEW_RUN_DIR) -> None:
    """load_state_dict for every group whose file exists in `folder`."""
    for group, plugin in plugins.items():
        path = Path(folder) / f"{group}.safetensors"
        if path.exists():
            plugin.load_state_dict(load_plugin_state(path, fix))


# ---- in-stage checkpoints ------------------------------------------------------------------


def save_checkpoint(
    files: StageFiles, model, state, optimizer, scheduler, plugins: dict[str, Plugin], init: Factors | None = None
) -> None:
    """Adapter, optimizer and scheduler state, RNG states, the step and every plug-in's state, and
    the stage's absorbed init factors (`init`, when the init was absorbed), as ONE set: written whole
    into checkpoint.partial/ (state.json last), then renamed into place (`_swap_in`). A kill at any
    moment leaves a complete set, never a new adapter beside an older optimizer state."""
    staging = files.partial_checkpoint
    shutil.rmtree(staging, ignore_errors=True)
    save_plugin_states(staging, plugins)
    if init is not None:
        atomic_save_tensors(staging / "init.safetensors", factors_to_tensors(init))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    atomic_save_tensors(staging / "trainable.safetensors", trainable)
    opt_state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in opt_state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    atomic_save_tensors(staging / "optimizer.safetensors", tensors)
    meta = {
        "step": state.step,
        "losses": state.losses,
        "param_groups": opt_state["param_groups"],
        "scalars": scalars,
        "scheduler": scheduler.state_dict(),
    }
    atomic_write_json(staging / "state.json", meta)
    _swap_in(staging, files.checkpoint)


def _swap_in(new: Path, target: Path) -> None:
    """Replace the folder `target` by the complete folder `new`: target -> target.old, new ->
    target, target.old removed (two renames; a kill between them is undone by settle_checkpoint)."""
    old = target.with_name(target.name + ".old")
    with critical():  # Ctrl-C / SIGTERM wait until the set is in place
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)


def settle_checkpoint(files: StageFiles) -> None:
    """After a kill: the newest complete checkpoint set becomes checkpoint/ (one killed between
    `_swap_in`'s renames is checkpoint.partial/ or checkpoint.old/), the leftovers are removed."""
    ckpt, partial = files.checkpoint, files.partial_checkpoint
    old = ckpt.with_name(ckpt.name + ".old")
    if not (ckpt / "state.json").exists():
        for candidate in (partial, old):
            if (candidate / "state.json").exists():
                shutil.rmtree(ckpt, ignore_errors=True)
                os.replace(candidate, ckpt)
                break
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _restart(files: StageFiles) -> str:
    return f"delete {files.checkpoint} to restart the stage from its first step"


def load_checkpoint_init(files: StageFiles) -> Factors | None:
    """The absorbed init factors the checkpointed stage started from (None: not absorbed, or a
    checkpoint written before they were saved)."""
    path = files.checkpoint / "init.safetensors"
    return tensors_to_factors(load_tensors(path, _restart(files))) if path.exists() else None


def load_checkpoint(files: StageFiles, model) -> tuple[Any, dict] | None:
    """(TrainState, optimizer/scheduler state) from an in-stage checkpoint, or None. RunDirError
    (with the fix: restart the stage) when one of its files is damaged."""
    from ..train.trainer import TrainState

    ckpt, fix = files.checkpoint, _restart(files)
    if not (ckpt / "state.json").exists():
        return None
    meta = read_file(ckpt / "state.json", lambda: json.loads((ckpt / "state.json").read_text()), fix)
    trainable = load_tensors(ckpt / "trainable.safetensors", fix)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(read_file(ckpt / "trainable.safetensors", lambda n=n: trainable[n], fix))
    tensors = load_tensors(ckpt / "optimizer.safetensors", fix)
    torch.set_rng_state(tensors.pop("rng.cpu"))
    if "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors.pop("rng.cuda"))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt_state = {"state": state, "param_groups": meta["param_groups"]}
    return TrainState(step=meta["step"], losses=meta["losses"]), {
        "optimizer": opt_state,
        "scheduler": meta["scheduler"],
    }

"""Checkpoints through orbax-checkpoint: asynchronous, atomic, verified, kept by a retention policy.

A checkpoint is a step directory RUN_DIR/checkpoints/<step>/ with these items:
    state/         params, optimizer state and step (orbax StandardSave: OCDBT files, one write per shard)
    meta/          JSON: config, data seed and position, anychip version, tokenizer and data-manifest
                   sha256, length of metrics.jsonl, and every array's name, shape and dtype
    tokenizer/     the tokenizer.json itself, so a checkpoint is usable without its run directory
    fingerprints/  (n_arrays, 2) uint32: a hash of every array's bits, in the order of meta's arrays

Complete or invisible: orbax writes into <step>.orbax-checkpoint-tmp, writes commit_success.txt last,
then renames the directory. Only renamed directories count as checkpoints, and temporary directories
left by a process killed mid-save are deleted when the next Checkpointer opens the directory.

Verified: tensorstore notices a truncated file but not a flipped byte inside a data chunk (that
restores as a wrong number, tried), so every array's fingerprint is stored at save time and checked
after restore. A restore that fails either way falls back to the previous complete checkpoint. The
fingerprints are computed on the devices and saved as one more array; save() waits for them (orbax
syncs on every array it is given), which costs milliseconds on accelerators but ~2 s per GB on
XLA:CPU, whose integer reductions are slow: `verify=False` skips them.

Restore takes an abstract state whose leaves carry the *current* mesh's shardings, so arrays land
where this run wants them whatever the device count of the run that saved them.

The checkpointer decides when it saves (`maybe_save`): every `every_steps` steps, once `every_minutes`
passed since the last save (agreed across processes), and at the end or a stop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from orbax.checkpoint import checkpoint_managers as policies

from anychip import __version__
from anychip.config import CheckpointConfig, Config, to_dict
from anychip.errors import DEBUG_ENV, UserError
from anychip.files import check_writable, storage_error
from anychip.parallel.distributed import Agreement

ITEMS = ("state", "meta", "tokenizer", "fingerprints")
# Test-only fault-injection hook: seconds to sleep after a save's files are written and before the
# directory is renamed, so that a test's SIGKILL lands inside the save. Unset in normal use.
COMMIT_DELAY_ENV = "ANYCHIP_TEST_COMMIT_DELAY_S"
SaveErrorPolicy = Literal["continue", "stop"]
# A checkpoint takes about its arrays' bytes on disk (OCDBT adds little); this much more is kept free.
SPACE_MARGIN_BYTES = 1 << 20


class _QuietOrbax(logging.Filter):
    """Orbax logs every failed write as an ERROR with a traceback, from several threads, and then raises
    it; the Checkpointer turns the raised error into one line, so the logged copies are dropped. So are
    asyncio's "Task exception was never retrieved" for orbax's write tasks left behind by a failed save."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = "orbax" in record.pathname or (record.name == "asyncio" and "orbax" in record.getMessage())
        return record.levelno < logging.ERROR or not from_orbax or bool(os.environ.get(DEBUG_ENV))


logging.getLogger("absl").addFilter(_QuietOrbax())
logging.getLogger("asyncio").addFilter(_QuietOrbax())


def _quiet_closed_loops(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """When one write of a save fails, orbax closes that save's event loop while tensorstore still
    finishes the others; each then reports "Event loop is closed" as an unraisable error from a
    tensorstore thread (a bare traceback per array). The failure itself reaches the Checkpointer and
    becomes one line; these echoes are dropped, anything else goes to the previous hook."""

    def unraisablehook(unraisable: Any) -> None:
        echo = (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"
                and threading.current_thread() is not threading.main_thread())
        if not echo or os.environ.get(DEBUG_ENV):
            hook(unraisable)

    return unraisablehook


sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)


class CheckpointSaveError(UserError):
    """A checkpoint could not be written and `on_save_error` is "stop"."""


class CorruptCheckpoint(Exception):
    """A checkpoint's files do not restore to what was saved."""


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = (str(error) or type(error).__name__).strip().splitlines()
    line = text[0] if text else type(error).__name__
    # Cut from the middle: the reason comes first in an OSError ("[Errno 30] Read-only file system: PATH")
    # and last in tensorstore's ("Error writing PATH: ... [OSError 30: Read-only file system]").
    return line if len(line) <= limit else f"{line[:limit // 2]} ... {line[-limit // 2:]}"


def _manager_options(keep: int | None, keep_every: int, async_save: bool,
                     read_only: bool = False) -> ocp.CheckpointManagerOptions:
    if read_only:  # a reader must not clean up the temporary directory of a save in flight elsewhere
        return ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False, read_only=True)
    keep_policies: list[Any] = [policies.LatestN(keep) if keep else policies.PreserveAll()]
    if keep_every:
        keep_policies.append(policies.EveryNSteps(keep_every))
    delay = float(os.environ.get(COMMIT_DELAY_ENV) or 0)
    # Directories are made in save() itself, not in the background: orbax's background mkdir, when it
    # fails (read-only, full), never sends the "directory created" signal that every item's writer
    # thread waits for, so those non-daemon threads sat out orbax's 300 s coordination timeout and
    # kept the process from exiting. Made here, a failed mkdir raises in save() and starts no thread.
    async_options = ocp.AsyncOptions(create_directories_asynchronously=False, post_finalization_callback=(
        (lambda: time.sleep(delay)) if async_save and delay > 0 else None))
    return ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True,
        preservation_policy=policies.AnyPreservationPolicy(keep_policies), async_options=async_options,
    )


def checkpoint_meta(cfg: Config, tokenizer_sha256: str, data_manifest_sha256: str | None = None,
                    **extra: Any) -> dict[str, Any]:
    """What every checkpoint records besides the arrays (`save` adds the step and the arrays' shapes;
    the loop the data position and metrics length, an import where the weights came from)."""
    return {"config": to_dict(cfg), "data_seed": cfg.train.seed, "anychip_version": __version__,
            "tokenizer_sha256": tokenizer_sha256, "data_manifest_sha256": data_manifest_sha256, **extra}


class SaveSchedule:
    """Due every `every_steps` steps and/or once `every_minutes` passed since the last save."""

    def __init__(self, every_steps: int = 0, every_minutes: float = 0.0):
        self.every_steps, self.every_s, self.last = every_steps, every_minutes * 60, time.monotonic()
        self._agree = Agreement()  # the clock differs between processes: they must agree to save

    def due(self, step: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_s) and self._agree(time.monotonic() - self.last >= self.every_s)

    def saved(self) -> None:
        self.last = time.monotonic()
        self._agree.forget()  # "is a save due?" asked before this save would say yes once more


class Checkpointer:
    """Numbered checkpoints of a train state in one directory (see the module docstring).

    keep: the newest `keep` complete checkpoints survive (None: all); keep_every: so does every
    checkpoint whose step is a multiple of it. on_save_error: "stop" raises CheckpointSaveError,
    "continue" logs a warning and goes on; either way the earlier checkpoints are untouched.
    verify: fingerprint the arrays at save and check them at restore (see the module docstring for
    the cost, and benchmarks/checkpoint_bench.py). schedule: when `maybe_save` saves. read_only: for
    readers (eval, generate, export): creates nothing, deletes nothing, cannot save.

    Storage faults are found before orbax starts a write (`check_storage`: the directory takes a file and
    has room for the arrays), and a background write that fails is noticed at the next step (`poll`).
    """

    def __init__(self, directory: str | Path, *, keep: int | None = 3, keep_every: int = 0,
                 async_save: bool = True, on_save_error: SaveErrorPolicy = "stop", verify: bool = True,
                 schedule: SaveSchedule | None = None, read_only: bool = False,
                 log: Callable[[str], None] = print):
        self.directory = Path(directory).absolute()
        self.on_save_error, self.verify, self.log, self.read_only = on_save_error, verify, log, read_only
        self.schedule = schedule or SaveSchedule()
        self._pending: int | None = None
        self._last_saved: int | None = None
        self._save_failed = False
        options = _manager_options(keep, keep_every, async_save, read_only)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        except OSError as e:  # not creatable: read-only parent, a file in the way
            raise storage_error(self.directory, e) from None

    @classmethod
    def from_config(cls, directory: str | Path, c: CheckpointConfig,
                    log: Callable[[str], None] = print) -> Checkpointer:
        return cls(directory, keep=c.keep, keep_every=c.keep_every, async_save=c.async_save,
                   on_save_error=c.on_save_error, verify=c.verify,
                   schedule=SaveSchedule(c.every_steps, c.every_minutes), log=log)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # -- saving -------------------------------------------------------------------------------

    def maybe_save(self, step: int, state: Any, meta: Callable[[], dict[str, Any]],
                   tokenizer: dict[str, Any] | None = None, last: bool = False) -> None:
        """Save `step` if the schedule says so, or if `last` (the run's end, a stop), unless it is saved
        already. `meta` is called only when saving (it may flush metrics first). Called after every
        step, it also reports a background save that failed since the last step (`poll`)."""
        self.poll()
        if step in (self._last_saved, self.latest_step()) or not (last or self.schedule.due(step)):
            return
        self.save(step, state, meta(), tokenizer)

    def poll(self) -> bool:
        """If the save in flight has ended, collect its outcome now (a failure raises or warns as in
        `save`) instead of at the next save; False if it failed under "continue"."""
        if self._pending is None or self._manager.is_saving_in_progress():
            return True
        return self._finish_pending()

    def check_storage(self, state: Any) -> None:
        """UserError unless the checkpoint directory takes a file and has room for `state`'s arrays: a
        read-only, full or missing directory is found before orbax starts (its failed background writes
        otherwise wait minutes for each other)."""
        need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) + SPACE_MARGIN_BYTES
        check_writable(self.directory)
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise UserError(f"{self.directory}: no room for a checkpoint ({free / 2**20:,.1f} MiB free, a "
                            f"checkpoint of this state takes about {need / 2**20:,.1f} MiB)")

    def save(self, step: int, state: Any, meta: dict[str, Any],
             tokenizer: dict[str, Any] | None = None) -> bool:
        """Start writing checkpoint `step`; in async mode the files are written in the background.

        Returns False if it could not be started (or the previous save failed) under "continue".
        """
        if self.read_only:
            raise TypeError("a read-only Checkpointer cannot save")
        ok = self._finish_pending()
        self.schedule.saved()
        self._last_saved = step
        try:
            self.check_storage(state)
        except UserError as e:
            self._failed(step, e)
            return False
        meta = {**meta, "step": step, "arrays": describe_arrays(state)}
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if self.verify:
            items["fingerprints"] = ocp.args.StandardSave({"uint32": fingerprint_array(state)})
        if tokenizer is not None:
            items["tokenizer"] = ocp.args.JsonSave(tokenizer)
        try:
            # force: we decide when to save; orbax would refuse a step below the latest (after a rewind).
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 - whatever the filesystem raised (read-only, full, not a dir)
            self._failed(step, e)
            return False
        self._pending = step
        return ok

    def wait(self) -> bool:
        """Block until the save in flight (if any) is on disk; False if it failed under "continue"."""
        return self._finish_pending()

    def _finish_pending(self) -> bool:
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - an async write failed; orbax re-raises whatever it was
            self._failed(step, e)
            return False
        return True

    def _failed(self, step: int | None, error: Exception) -> None:
        self._save_failed = True
        message = (f"could not write checkpoint {step} in {self.directory} ({_one_line(error)}); "
                   f"the earlier checkpoints are intact (newest complete: {self.latest_step()})")
        if self.on_save_error == "stop":
            raise CheckpointSaveError(f"{message}; stopping (checkpoint.on_save_error=stop)") from error
        self.log(f"warning: {message}; training goes on (checkpoint.on_save_error=continue)")

    # -- restoring ----------------------------------------------------------------------------

    def read_meta(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def read_tokenizer(self, step: int) -> dict[str, Any] | None:
        if not (self.directory / str(step) / "tokenizer").is_dir():
            return None
        args = ocp.args.Composite(tokenizer=ocp.args.JsonRestore())
        return self._manager.restore(step, args=args)["tokenizer"]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """abstract_state: a tree of jax.ShapeDtypeStruct with shardings (see `abstract_like`); None
        subtrees are not restored. Raises UserError if the shapes differ, CorruptCheckpoint (or what
        orbax raises) if the files are damaged."""
        meta = self.read_meta(step)
        check_compatible(abstract_state, meta.get("arrays"), f"{self.directory}/{step}")
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )["state"]
        if self.verify and (self.directory / str(step) / "fingerprints").is_dir():
            target = {"uint32": _replicated_like(abstract_state, len(meta["arrays"]))}
            args = ocp.args.Composite(fingerprints=ocp.args.StandardRestore(target))
            saved = self._manager.restore(step, args=args)["fingerprints"]["uint32"]
            verify(restored, list(meta["arrays"]), jax.device_get(saved), f"{self.directory}/{step}")
        return restored, meta

    def restore_newest(self, abstract_state: Any, max_step: int | None = None
                       ) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest checkpoint (<= max_step) that restores intact; None if none.

        A damaged checkpoint is skipped with a warning and moved to `checkpoints.corrupt/` (a later
        save of the same step would otherwise collide with it), but only once an older one restored:
        if none does, the fault is more likely here than in the files, so nothing is moved.
        """
        failures: list[tuple[int, Exception]] = []
        for step in reversed([s for s in self.all_steps() if max_step is None or s <= max_step]):
            try:
                state, meta = self.restore(step, abstract_state)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - damage shows as tensorstore, JSON or fingerprint errors
                failures.append((step, e))
                continue
            for bad, error in failures:
                where = self.set_aside([bad], "corrupt")
                self.log(f"warning: checkpoint {bad} is unusable ({_one_line(error)}); moved it to {where}; "
                         f"using checkpoint {step}")
            return step, state, meta
        if failures:
            step, error = failures[0]
            raise UserError(f"no checkpoint in {self.directory} restores: step {step}: {_one_line(error)}")
        return None

    def set_aside(self, steps: list[int], reason: str) -> Path:
        """Move checkpoint directories out of the way (never delete) into <directory>.<reason>/."""
        target = self.directory.with_name(f"{self.directory.name}.{reason}")
        if not steps:
            return target
        self.wait()  # a save in flight would land next to the moved ones
        if jax.process_index() == 0:
            target.mkdir(exist_ok=True)
            for step in steps:
                dest = target / str(step)
                n = 1
                while dest.exists():
                    dest, n = target / f"{step}-{n}", n + 1
                shutil.move(str(self.directory / str(step)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"anychip_set_aside_{reason}")
        self._manager.reload()
        return target

    def close(self) -> bool:
        """Wait for the save in flight and let go of the directory; False if that save failed. Never
        raises for a failed save: close runs in `finally` blocks, where it must not hide the error that
        is on its way (the failure is logged as a warning instead)."""
        try:
            ok = self._finish_pending()
        except CheckpointSaveError as e:
            self.log(f"warning: {e}")
            ok = False
        try:
            self._manager.close()
        except OSError as e:  # orbax's last metadata write, on the storage that may have failed a save
            if not self._save_failed:  # else that failure was reported already: one line, not two
                self.log(f"warning: {storage_error(self.directory, e)}")
            ok = False
        return ok


# ---------------------------------------------------------------------------------------------
# Array descriptions: shapes for compatibility checks, fingerprints for integrity


def _as_uint32(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size >= 4:  # 8-byte types get a trailing axis of 2
        return lax.bitcast_convert_type(x, jnp.uint32)
    return lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Wrapping uint32 sums of the bit patterns, plain and weighted by position.

    Integer addition is exact in any order, so the result does not depend on how the array is
    sharded; the position weight catches values that moved, which a plain sum would miss.
    """
    bits = _as_uint32(x)
    index = jnp.zeros(bits.shape, jnp.uint32)
    for axis, size in enumerate(bits.shape):
        index = index * jnp.uint32(size) + lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
    return jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


_fingerprints = jax.jit(lambda leaves: jnp.stack([jnp.stack(_fingerprint(x)) for x in leaves]))  # (n, 2)


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path, simple=True, separator="."), leaf) for path, leaf in flat]


def describe_arrays(tree: Any) -> dict[str, dict[str, Any]]:
    """{name: {shape, dtype}} for every array of `tree`, in the order of `fingerprint_array`."""
    return {name: {"shape": list(leaf.shape), "dtype": str(leaf.dtype)} for name, leaf in _named_leaves(tree)}


def fingerprint_array(tree: Any) -> jax.Array:
    """(n_arrays, 2) uint32 fingerprints of `tree`'s arrays, computed on their devices (asynchronously)."""
    return _fingerprints(jax.tree.leaves(tree))


def _replicated_like(abstract_state: Any, n: int) -> jax.ShapeDtypeStruct:
    """Where to restore the fingerprints: replicated over the mesh of the state being restored."""
    sharding = next(x.sharding for x in jax.tree.leaves(abstract_state) if x is not None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.ShapeDtypeStruct((n, 2), jnp.uint32, sharding=sharding)


def check_compatible(abstract_state: Any, saved: dict[str, dict[str, Any]] | None, where: str) -> None:
    """One-line UserError naming the first array whose shape or dtype differs from the checkpoint's."""
    if saved is None:
        return
    for name, leaf in _named_leaves(abstract_state):
        if name not in saved:
            raise UserError(f"{where} has no array '{name}': it was written for a different model or "
                            "optimizer; use a new run_dir (or init_from=)")
        shape, dtype = tuple(saved[name]["shape"]), saved[name]["dtype"]
        if shape != tuple(leaf.shape) or dtype != str(leaf.dtype):
            raise UserError(f"{where} does not fit this config: '{name}' is {dtype}{list(shape)} in the "
                            f"checkpoint but {leaf.dtype}{list(leaf.shape)} here; resume with the run's "
                            "model settings or start a new run_dir")


def verify(state: Any, saved_names: list[str], saved: np.ndarray, where: str) -> None:
    """Compare the restored arrays' fingerprints with those saved (rows in `saved_names` order)."""
    row = {name: i for i, name in enumerate(saved_names)}
    named = _named_leaves(state)
    got = jax.device_get(fingerprint_array([leaf for _, leaf in named]))
    for (name, _), fingerprint in zip(named, got):
        if name in row and not np.array_equal(fingerprint, saved[row[name]]):
            raise CorruptCheckpoint(f"array '{name}' in {where} does not match the fingerprint saved with it")


def abstract_like(shapes_dtypes: Any, shardings: Any) -> Any:
    """Pair a tree of ShapeDtypeStructs (e.g. from jax.eval_shape) with a tree of shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes_dtypes, shardings)


def tokenizer_json(path: str | Path) -> dict[str, Any]:
    """A tokenizer.json as data, to store in a checkpoint (`Checkpointer.save(tokenizer=...)`)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))

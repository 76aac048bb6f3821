"""Checkpoints through orbax-checkpoint: the train state plus a JSON record of what produced it.

A checkpoint is a step directory under RUN_DIR/checkpoints holding two items: `state` (params,
optimizer state and step, written by orbax's StandardSave, one file set per array shard) and
`meta` (JSON: config, data seed, anychip version, data manifest checksum). Orbax writes into a
temporary directory and renames it when complete, so a half-written checkpoint is never listed.
Restore takes an abstract state whose leaves carry the *current* mesh's shardings, so arrays land
where this run wants them whatever the device count of the run that saved them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts an (asynchronous) save; `wait()` blocks until it is on disk."""
        self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """abstract_state: a tree of jax.ShapeDtypeStruct with shardings (see `abstract_like`)."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def read_meta(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(shapes_dtypes: Any, shardings: Any) -> Any:
    """Pair a tree of ShapeDtypeStructs (e.g. from jax.eval_shape) with a tree of shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes_dtypes, shardings)

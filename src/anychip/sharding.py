"""Device mesh and the logical-axis → mesh-axis rules that place parameters and batches.

Sharding is data: the model names the axes of every parameter ("embed", "mlp", ...) and the table
below says which mesh axis, if any, splits each. FSDP splits the embedding axis of every matrix
over `fsdp` (ZeRO-3: params, grads and optimizer state are sharded alike); tensor parallelism
splits heads and the MLP hidden axis over `tensor` (Megatron); batches split over `data` × `fsdp`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from anychip.config import MeshConfig
from anychip.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical parameter axis → mesh axis (None = replicated).
PARAM_RULES: dict[str, str | None] = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
}

BATCH_AXES = ("data", "fsdp")


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve the one -1 axis to the devices left over; the product must equal n_devices."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise UserError(f"mesh {tuple(sizes)} does not divide the {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise UserError(f"mesh data×fsdp×tensor = {math.prod(sizes)} but there are {n_devices} devices")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for a parameter; an axis whose size the mesh axis does not divide stays replicated."""
    spec = []
    for name, size in zip(axes, shape):
        mesh_axis = PARAM_RULES[name]
        if mesh_axis is not None and (mesh.shape[mesh_axis] == 1 or size % mesh.shape[mesh_axis]):
            mesh_axis = None
        spec.append(mesh_axis)
    return P(*spec)


def param_shardings(axes: Any, shapes: Any, mesh: Mesh) -> Any:
    """Tree of NamedShardings from trees of logical axes and shapes (same structure)."""
    return jax.tree.map(
        lambda a, s: NamedSharding(mesh, logical_to_spec(a, s, mesh)), axes, shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches (B, T+1): rows split over data × fsdp, sequence whole."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_rows: np.ndarray, mesh: Mesh, global_rows: int) -> jax.Array:
    """Assemble this process's rows of a batch into one global array sharded over the mesh."""
    sharding = batch_sharding(mesh)
    shape = (global_rows,) + local_rows.shape[1:]
    if jax.process_count() == 1:
        return jax.device_put(local_rows, sharding)
    return jax.make_array_from_process_local_data(sharding, local_rows, shape)

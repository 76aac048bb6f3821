"""Device mesh, the logical-axis → mesh-axis rules for parameters and activations, and process start-up.

Sharding is data: the model names the axes of every parameter ("embed", "mlp", ...) and of the
activations it constrains ("batch", "seq", ...), and the two tables below say which mesh axes, if
any, split each. Parameters and activations get separate tables because the same logical axis is
split differently: FSDP splits the *parameters'* embedding axis over `fsdp` (ZeRO-3: params, grads
and optimizer state are sharded alike and all-gathered one layer at a time inside the scan), while
the *activations* split their batch over `data` × `fsdp` and keep the embedding whole. Tensor
parallelism (Megatron) splits heads, the MLP hidden axis and the vocabulary over `tensor`, for
weights and activations alike, so attention and the MLP need one all-reduce each per direction.

    mesh axis   params                        activations
    data        replicated (pure DP)          batch
    fsdp        embed                         batch
    tensor      heads, kv_heads, mlp, vocab   heads, kv_heads, mlp, vocab

Single-process runs use the local devices; multi-process runs call `distributed.initialize_distributed`
first, after which `jax.devices()` spans every process and the same code runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from anychip.config import MeshConfig
from anychip.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
AnyMesh = Mesh | AbstractMesh
Rule = str | tuple[str, ...] | None

# Logical parameter axis → mesh axis (None = replicated).
PARAM_RULES: dict[str, Rule] = {
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

# Logical activation axis → mesh axes. The residual stream (batch, seq, embed) is split over the batch
# only: it is replicated over `tensor` between blocks, as in Megatron without sequence parallelism.
ACTIVATION_RULES: dict[str, Rule] = {
    "batch": BATCH_AXES,
    "seq": None,
    "embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
}


# ---------------------------------------------------------------------------------------------
# The mesh


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
    """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process).

    jax.make_mesh orders TPU devices along the physical torus; elsewhere it keeps `jax.devices()`
    order, which lists each process's devices together, so `tensor` (the innermost, most
    communication-heavy axis) stays inside a host whenever it fits.
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    except (NotImplementedError, ValueError):  # a device subset or topology make_mesh cannot lay out
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def abstract_mesh(cfg: MeshConfig, n_devices: int) -> AbstractMesh:
    """A mesh of `n_devices` that need not exist: for lowering and exporting (`anychip check`)."""
    return AbstractMesh(mesh_shape(cfg, n_devices), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def check_batch(mesh: AnyMesh, batch_size: int, grad_accum: int) -> None:
    """Every microbatch must split evenly over the batch axes (data × fsdp)."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = batch_size // grad_accum
    if micro % ways:
        raise UserError(
            f"the microbatch of train.batch_size/train.grad_accum = {micro} rows does not split over "
            f"mesh data×fsdp = {ways} devices; make the batch a multiple of {ways * grad_accum}"
        )


# ---------------------------------------------------------------------------------------------
# Logical axes → PartitionSpecs


def _mesh_axes_for(rule: Rule, size: int, mesh: AnyMesh, used: set[str]) -> Rule:
    """The longest prefix of the rule's mesh axes that evenly splits a dimension of `size`.

    A size-1 mesh axis splits nothing and is skipped, never a reason to stop: with `data=1, fsdp=8`
    the batch must still split over fsdp (stopping there once left every device computing every row).
    """
    names = (rule,) if isinstance(rule, str) else tuple(rule or ())
    chosen: list[str] = []
    for name in names:
        if mesh.shape[name] == 1:
            continue
        ways = math.prod(mesh.shape[a] for a in chosen) * mesh.shape[name]
        if name in used or size % ways:
            break
        chosen.append(name)
    used.update(chosen)
    if not chosen:
        return None
    return chosen[0] if len(chosen) == 1 else tuple(chosen)


def spec_for(axes: tuple[str, ...], shape: tuple[int, ...], mesh: AnyMesh, rules: Mapping[str, Rule]) -> P:
    """PartitionSpec from logical axis names; a dimension the mesh axes do not divide stays whole."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    used: set[str] = set()
    return P(*(_mesh_axes_for(rules[name], size, mesh, used) for name, size in zip(axes, shape)))


def logical_to_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: AnyMesh) -> P:
    """PartitionSpec for a parameter."""
    return spec_for(axes, shape, mesh, PARAM_RULES)


def param_shardings(axes: Any, shapes: Any, mesh: AnyMesh) -> Any:
    """Tree of NamedShardings from trees of logical axes and shapes (same structure)."""
    return jax.tree.map(
        lambda a, s: NamedSharding(mesh, logical_to_spec(a, s, mesh)), axes, shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def batch_sharding(mesh: AnyMesh) -> NamedSharding:
    """Token batches (B, T+1): rows split over data × fsdp, sequence whole."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def replicated(mesh: AnyMesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------------------------
# Activation constraints. The model calls `constrain(x, ("batch", "seq", "embed"))`; it is a no-op
# unless a train/eval step is being traced under `activation_mesh(mesh)`, so the model stays a pure
# function that knows nothing about meshes, and single-device code (generate, tests) is unchanged.

_ACTIVATION_MESH: contextvars.ContextVar[AnyMesh | None] = contextvars.ContextVar("mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: AnyMesh | None) -> Iterator[None]:
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def current_mesh() -> AnyMesh | None:
    """The activation mesh being traced under, if any (kernels that must run in shard_map need it)."""
    return _ACTIVATION_MESH.get()


def constrain(x: jax.Array, axes: tuple[str, ...], rules: Mapping[str, Rule] = ACTIVATION_RULES) -> jax.Array:
    """Pin activation `x` to the layout its logical axes give under the current activation mesh
    (`rules=PARAM_RULES`: a parameter-shaped value, such as a gradient accumulated in a loop).

    Without these, XLA's propagation may resolve a (batch-sharded activation) × (fsdp-sharded
    weight) matmul by resharding the activations instead of all-gathering the weight.
    """
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    spec = spec_for(axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def with_activation_sharding(fn: Callable, mesh: AnyMesh) -> Callable:
    """`fn` traced with `mesh` as the activation mesh (wrap before jax.jit: tracing happens inside)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with activation_mesh(mesh):
            return fn(*args, **kwargs)

    return wrapped


# ---------------------------------------------------------------------------------------------
# Batches across processes


def data_shard(mesh: Mesh, global_rows: int, devices: set | None = None) -> tuple[int, int]:
    """(index, count): this process needs rows [index·B/count, (index+1)·B/count) of each global batch.

    That is (process_index, process_count) whenever the batch axes split evenly across processes,
    and e.g. (0, 1) where a process's devices together hold every row (a tensor axis spanning
    processes: one process per GPU with mesh.tensor=8). Pass it to TokenDataset.batch as its
    process_index / process_count. `devices`: this process's devices (tests pass others).
    """
    if devices is None:
        devices = {d for d in mesh.devices.flat if d.process_index == jax.process_index()}
    indices = batch_sharding(mesh).devices_indices_map((global_rows, 1))
    spans = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop)
                    for d, s in indices.items() if d in devices})
    lo, hi = spans[0][0], max(stop for _, stop in spans)
    covered = np.zeros(global_rows, bool)
    for start, stop in spans:
        covered[start:stop] = True
    n = hi - lo
    if not covered[lo:hi].all() or global_rows % n or lo % n:
        raise UserError(f"this process's devices hold rows {spans} of the batch, not one contiguous block: "
                        "the device order interleaves processes along mesh data×fsdp; try other mesh sizes")
    return lo // n, global_rows // n


def global_batch(local_rows: np.ndarray, mesh: Mesh, global_rows: int) -> jax.Array:
    """Assemble this process's rows of a batch (see `data_shard`) into one global array over the mesh."""
    sharding = batch_sharding(mesh)
    shape = (global_rows,) + local_rows.shape[1:]
    if jax.process_count() == 1:
        return jax.device_put(local_rows, sharding)
    return jax.make_array_from_process_local_data(sharding, local_rows, shape)

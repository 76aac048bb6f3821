"""Several processes: `jax.distributed` start-up, agreement between processes, the compilation cache.

Multi-host runs start one `anychip train` per host (or per GPU) with the same arguments; each calls
`initialize_distributed` before touching a device (docs/scaling-out.md). Decisions that change what
the processes run next (stop, save) must be the same on every process, or their collectives hang:
`Agreement` makes them so without a host sync per step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from anychip.config import DistributedConfig
from anychip.errors import UserError


def is_main_process() -> bool:
    """Process 0 alone writes run files (config, metrics, reports); orbax coordinates checkpoints itself."""
    return jax.process_index() == 0


DISTRIBUTED_ENV = {
    "coordinator_address": "ANYCHIP_COORDINATOR",
    "num_processes": "ANYCHIP_NUM_PROCESSES",
    "process_id": "ANYCHIP_PROCESS_ID",
}


class Agreement:
    """True on every process if a flag was True on any: processes must take the same checkpoint and stop
    decisions, or their collectives hang.

    With one process the answer is the flag itself. With several it comes one call late: the max over all
    processes' flags is dispatched as a device computation behind the step just dispatched, and read at
    the next call, after the next step is dispatched. A blocking all-gather on every step would make the
    host wait for the device on every step and leave the device idle while the host prepares the next one.
    Every process calls at the same steps (the loop is the same program), so all read the same answers.
    """

    def __init__(self) -> None:
        self.pending: jax.Array | None = None
        if jax.process_count() > 1:
            mesh = Mesh(np.array(jax.devices()), ("processes",))
            self.rows = NamedSharding(mesh, P("processes"))
            self.reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

    def __call__(self, flag: bool) -> bool:
        if jax.process_count() == 1:
            return flag
        local = np.full((jax.local_device_count(),), flag, np.int32)
        answer, self.pending = self.pending, self.reduce(jax.make_array_from_process_local_data(self.rows, local))
        return answer is not None and bool(answer)

    def forget(self) -> None:
        """Drop the answer in flight (it was asked before a change that all processes made together)."""
        self.pending = None


def distributed_args(cfg: DistributedConfig, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """jax.distributed.initialize arguments: the config's, else ANYCHIP_* environment variables."""
    args: dict[str, Any] = {}
    for name, var in DISTRIBUTED_ENV.items():
        value = getattr(cfg, name)
        if value is None and environ.get(var):
            value = environ[var]
            if name != "coordinator_address":
                try:
                    value = int(value)
                except ValueError:
                    raise UserError(f"{var}={value!r} is not an integer") from None
        if value is not None:
            args[name] = value
    return args


def launched_processes(environ: Mapping[str, str] = os.environ) -> int:
    """How many processes a launcher says it started (1 if none): SLURM srun, Open MPI, Cloud TPU on GKE."""
    if "SLURM_STEP_NODELIST" in environ and "SLURM_PROCID" in environ:  # inside an srun step
        return int(environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", "1")))
    if "OMPI_COMM_WORLD_SIZE" in environ:
        return int(environ["OMPI_COMM_WORLD_SIZE"])
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")
    slices = int(environ.get("MEGASCALE_NUM_SLICES") or 1)
    return len(hosts.split(",")) * slices if hosts else slices


def initialize_distributed(cfg: DistributedConfig, log: Callable[[str], None] = print,
                           environ: Mapping[str, str] = os.environ) -> bool:
    """Start jax.distributed when configured or launched multi-process; True if it is running.

    Must run before anything touches a JAX backend (jax.devices(), any computation).
    """
    if cfg.initialize == "never":
        return False
    if jax.distributed.is_initialized():
        return True
    args = distributed_args(cfg, environ)
    if cfg.initialize == "auto" and "coordinator_address" not in args and launched_processes(environ) <= 1:
        return False
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):  # CPU collectives across processes
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**args, initialization_timeout=cfg.timeout_s)
    except ValueError as e:  # e.g. a coordinator without num_processes outside any known cluster
        raise UserError(f"jax.distributed.initialize({args}): {e}") from None
    log(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} of {jax.device_count()} devices local")
    return True


def enable_compile_cache(directory: str | None) -> Path | None:
    """Persist compiled executables, so a restart or resume does not pay the compile again.

    JAX caches only compiles that took >= 1 s (jax_persistent_cache_min_compile_time_secs): smaller
    ones cost more disk reads than they save.
    """
    if directory is None or directory.strip().lower() in ("", "none", "null"):
        return None
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path

"""`anychip check --compile --target T`: compile the real train step with the target chip's own compiler on a
machine without that chip, and report its memory per device against the chip's HBM.

Targets are catalog keys with a chip count: `tpu-v5p:8`, `tpu-v6e:16`, `h100:8`, `h200:1`, and `cpu:N`
(N virtual CPU devices, so CI runs the same path). TPUs compile with libtpu through
`jax.experimental.topologies.get_topology_desc` (a slice of the shape Google sells); NVIDIA GPUs with
XLA:GPU from the CUDA PJRT plugin, given a target description (`GPU_SPECS`, written from NVIDIA's
figures) instead of a device. Both come with the `aot` extra (`pip install -e ".[aot]"`); neither needs
drivers or CUDA libraries. cuDNN attention is compiled as on the real chip (compute.attention=auto).

The TPU compiler fails an over-capacity program with RESOURCE_EXHAUSTED: that is one line, "does not fit".
XLA:GPU compiles any size, so the peak is compared with the capacity here.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import xla_bridge

from anychip import jaxenv
from anychip.check.portability import assumed_cudnn_version, for_platform
from anychip.config import Config, load_config
from anychip.cost.hardware import get_chip, load_catalog
from anychip.errors import UserError
from anychip.parallel import mesh as sharding
from anychip.train import memory
from anychip.train.step import abstract_state, build_trainer

GiB = 2**30

# Catalog key → (libtpu's generation name, torus dimensions, chip config). v4 and v5p run their two
# TensorCores as one device ("megacore"); TPU7x shows each TensorCore as a device (2 per chip).
TPU_GENERATIONS: dict[str, tuple[str, int, str]] = {
    "tpu-v4": ("v4", 3, "megacore"), "tpu-v5e": ("v5e", 2, "default"), "tpu-v5p": ("v5p", 3, "megacore"),
    "tpu-v6e": ("v6e", 2, "default"), "tpu-7x": ("tpu7x", 3, "default"),
}

# XLA:GPU target descriptions (stream_executor.GpuTargetConfigProto), one row of figures per GPU:
# NVIDIA H100 Tensor Core GPU datasheet and the NVIDIA H100 (Hopper) architecture whitepaper, table 3
# (SXM5: 132 SMs, compute capability 9.0, 1,980 MHz boost, 128 FP32 cores/SM, 228 KB shared memory/SM
# (227 KB per block opt-in), 64K registers/SM, 2,048 threads/SM, 50 MB L2, 80 GB HBM3 at 3.35 TB/s);
# NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200: 141 GB HBM3e at 4.8 TB/s,
# the same GH100 Hopper GPU as the H100 SXM, so its SM figures are the H100's).
_HOPPER = {"sm": 132, "clock_ghz": 1.98, "l2": 50 * 2**20, "smem_sm": 228 * 1024, "smem_optin": 227 * 1024}
GPU_SPECS: dict[str, dict[str, Any]] = {
    "h100": {**_HOPPER, "name": "NVIDIA H100 80GB HBM3", "memory": 80e9, "bandwidth": 3.35e12},
    "h200": {**_HOPPER, "name": "NVIDIA H200 141GB HBM3e", "memory": 141e9, "bandwidth": 4.8e12},
}
GPUS_PER_HOST = 8  # HGX boards: the topology is 1 slice × hosts × 8 GPUs
CUDNN = (9, 10, 0)  # the cuDNN the CUDA 12 plugin builds against; fused attention is planned for it


def gpu_target_config(key: str) -> str:
    """The text proto XLA:GPU compiles for in place of a device."""
    s = GPU_SPECS[key]
    return f"""gpu_device_info {{
  cuda_compute_capability {{ major: 9 minor: 0 }}
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {s["smem_sm"]}
  shared_memory_per_block_optin: {s["smem_optin"]}
  threads_per_core_limit: 2048
  core_count: {s["sm"]}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(s["bandwidth"])}
  l2_cache_size: {s["l2"]}
  clock_rate_ghz: {s["clock_ghz"]}
  device_memory_size: {int(s["memory"])}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {CUDNN[0]} minor: {CUDNN[1]} patch: {CUDNN[2]} }}
device_description_str: "{s["name"]}"
"""


@dataclass(frozen=True)
class Target:
    key: str  # catalog key or "cpu"
    chips: int
    platform: str  # "tpu", "cuda" or "cpu"

    def __str__(self) -> str:
        return f"{self.key}:{self.chips}"


def parse_target(text: str) -> Target:
    """'tpu-v5p:8' → Target; one clear line for anything else."""
    key, sep, count = text.strip().lower().partition(":")
    known = sorted(TPU_GENERATIONS) + sorted(GPU_SPECS) + ["cpu"]
    if not sep or not count.isdigit() or int(count) < 1 or key not in known:
        raise UserError(f"--target must be KEY:CHIPS with KEY one of {', '.join(known)}, e.g. tpu-v5p:8 or "
                        f"h100:8; got '{text}'")
    platform = "tpu" if key in TPU_GENERATIONS else "cuda" if key in GPU_SPECS else "cpu"
    return Target(key, int(count), platform)


def tpu_shape(key: str, chips: int) -> tuple[int, ...]:
    """The slice shape of `chips` chips, as Google sells them: 2-D tori 1x1, 2x2, 2x4, 4x4, 4x8, ...;
    3-D ones 2x2x1, 2x2x2, then z, y and x double in turn (2x2x4, 2x4x4, 4x4x4, 4x4x8, ...)."""
    dims = TPU_GENERATIONS[key][1]
    k = chips.bit_length() - 1  # chips = 2**k
    valid = chips == 2**k and (k >= 2 or (dims == 2 and k == 0))
    if not valid:
        smallest = 1 if dims == 2 else 4
        raise UserError(f"{key} slices have {smallest}, {', '.join(str(2**i) for i in range(2 if dims == 2 else 3, 8))}"
                        f", ... chips, not {chips}")
    if dims == 2:
        x = 2 ** (k // 2)
        return (x, chips // x)
    if k == 2:
        return (2, 2, 1)
    shape = [2, 2, 2]
    for i in range(k - 3):
        shape[2 - i % 3] *= 2
    return tuple(shape)


def target_devices(target: Target) -> list:
    """Devices to compile for: compile-only TPU or GPU devices, or this process's CPU devices."""
    if target.platform == "cpu":
        if not xla_bridge.backends_are_initialized():
            jax.config.update("jax_num_cpu_devices", max(target.chips, jax.config.jax_num_cpu_devices))
        devices = jax.devices("cpu")
        if len(devices) < target.chips:
            raise UserError(f"{target} needs {target.chips} CPU devices but this process has {len(devices)}: "
                            f"set XLA_FLAGS=--xla_force_host_platform_device_count={target.chips}")
        return devices[: target.chips]
    from jax.experimental import topologies

    if target.platform == "tpu":
        name, _, chip_config = TPU_GENERATIONS[target.key]
        shape = tpu_shape(target.key, target.chips)
        host = tuple(shape) + (1,) * (3 - len(shape)) if target.chips <= 8 else (2, 2, 1)
        # Compile-only use touches no chip, so several processes may load libtpu at once (it takes a lock
        # file otherwise, for the devices' sake); set before libtpu starts.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        with jaxenv.captured_stderr():  # libtpu's start-up lines about the (absent) TPU host
            topo = topologies.get_topology_desc(platform="tpu", topology_name=f"{name}:{'x'.join(map(str, shape))}",
                                                chip_config_name=chip_config, chips_per_host_bounds=host)
        return list(topo.devices)
    jaxenv.load_plugins()
    hosts = max(1, target.chips // GPUS_PER_HOST)
    per_host = target.chips // hosts
    if hosts * per_host != target.chips:
        raise UserError(f"{target}: more than {GPUS_PER_HOST} GPUs come in hosts of {GPUS_PER_HOST}")
    with jaxenv.captured_stderr():
        topo = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{per_host}",
                                            target_config=gpu_target_config(target.key))
    return list(topo.devices)


@dataclass(frozen=True)
class CompileReport:
    """Per-device memory of the compiled train step on a target (bytes), or why it did not fit."""

    target: str
    devices: int
    mesh: dict[str, int]
    argument_bytes: float
    output_bytes: float
    alias_bytes: float  # outputs written into donated arguments (the train state)
    temp_bytes: float
    peak_bytes: float
    hbm_bytes: float | None  # per device; None for cpu
    planner_peak_bytes: float
    compile_s: float
    compiler: str
    error: str = ""  # "does not fit: ..." when the TPU compiler ran out of HBM

    @property
    def fits(self) -> bool | None:
        if self.error:
            return False
        return None if self.hbm_bytes is None else self.peak_bytes <= self.hbm_bytes

    def as_json(self) -> dict[str, Any]:
        return {**self.__dict__, "fits": self.fits}


# libtpu words it two ways: "Used 117.80G of 95.74G hbm." (the whole program), or "the total memory required
# for HLO temporaries (68.08G) exceeds available HBM (15.75G)" (temporaries alone already too many).
_TPU_OOM = re.compile(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm|"
                      r"required for HLO temporaries \(([\d.]+)([KMGT])?\) exceeds available HBM \(([\d.]+)([KMGT])?\)")
_UNITS = {None: 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def tpu_oom(message: str) -> tuple[float, float] | None:
    """(bytes needed, bytes available) from the TPU compiler's RESOURCE_EXHAUSTED message."""
    m = _TPU_OOM.search(message)
    if "RESOURCE_EXHAUSTED" not in message or not m:
        return None
    g = m.groups()[:4] if m.group(1) else m.groups()[4:]
    return float(g[0]) * _UNITS[g[1]], float(g[2]) * _UNITS[g[3]]


def hbm_per_device(target: Target, n_devices: int) -> float | None:
    if target.platform == "cpu":
        return None
    chip = get_chip(target.key, load_catalog())
    return None if chip.hbm_bytes is None else chip.hbm_bytes * target.chips / n_devices


def compiler_name(target: Target) -> str:
    from importlib.metadata import PackageNotFoundError, version

    package = {"tpu": "libtpu", "cuda": "jax-cuda12-plugin", "cpu": "jaxlib"}[target.platform]
    try:
        return f"{package} {version(package)}"
    except PackageNotFoundError:
        return package


def require_aot(target: Target) -> None:
    """One line naming the extra to install when the target's compiler is missing (exit 2)."""
    if target.platform != "cpu" and not jaxenv.aot_installed():
        raise UserError(f"compiling for {target} needs the target compilers: pip install -e \".[aot]\"")


def planner_estimate(cfg: Config, target: Target, mesh: dict[str, int]) -> float:
    """The planner's peak bytes per device for `cfg` on `target` (attention resolved for the target)."""
    return memory.estimate(for_platform(cfg, target.platform), mesh)["total"]


def compile_step(cfg: Config, target: Target) -> CompileReport:
    """Compile `cfg`'s train step for `target` and read XLA's memory analysis of it."""
    require_aot(target)
    devices = target_devices(target)
    cfg = for_platform(cfg, target.platform)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    shape = dict(mesh.shape)
    trainer = build_trainer(cfg, mesh)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1), jnp.int32,
                                 sharding=sharding.batch_sharding(mesh))
    planner = planner_estimate(cfg, target, shape)
    hbm = hbm_per_device(target, len(devices))
    common = {"target": str(target), "devices": len(devices), "mesh": shape, "hbm_bytes": hbm,
              "planner_peak_bytes": planner, "compiler": compiler_name(target)}
    start = time.perf_counter()
    try:
        with assumed_cudnn_version(), jaxenv.captured_stderr():
            compiled = trainer.step.lower(abstract_state(trainer), batch).compile()
    except jax.errors.JaxRuntimeError as e:
        oom = tpu_oom(str(e))
        if oom is None:
            raise
        needed, available = oom
        return CompileReport(**common, argument_bytes=math.nan, output_bytes=math.nan, alias_bytes=math.nan,
                             temp_bytes=math.nan, peak_bytes=needed, compile_s=time.perf_counter() - start,
                             error=f"does not fit: needs {needed / GiB:.1f} GiB of {available / GiB:.1f} GiB per device")
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    peak, _ = memory.xla_peak_bytes(compiled)
    return CompileReport(**common, argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
                         alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes, peak_bytes=peak,
                         compile_s=seconds)


def format_compile_report(r: CompileReport) -> list[str]:
    """Lines for the terminal; the last says whether it fits."""
    h = memory.human
    mesh = " ".join(f"{k}={v}" for k, v in r.mesh.items())
    lines = [f"{r.target}: compiled by {r.compiler} for {r.devices} devices, mesh {mesh}, in {r.compile_s:.1f} s"]
    if r.error:
        return lines + [f"{r.target}: {r.error} (planner estimate {h(r.planner_peak_bytes)})"]
    lines.append(f"{r.target}: per device: arguments {h(r.argument_bytes)}, outputs {h(r.output_bytes)} "
                 f"({h(r.alias_bytes)} donated), temporaries {h(r.temp_bytes)}; peak {h(r.peak_bytes)}")
    ratio = r.planner_peak_bytes / r.peak_bytes if r.peak_bytes else math.nan
    lines.append(f"{r.target}: planner estimate {h(r.planner_peak_bytes)} ({ratio:.2f}x the compiler's)")
    if r.hbm_bytes is None:
        return lines + [f"{r.target}: HBM unknown (CPU devices): fits not judged"]
    verdict = "fits" if r.fits else "does not fit"
    return lines + [f"{r.target}: {verdict}: {h(r.peak_bytes)} of {h(r.hbm_bytes)} HBM per device"]


def plan_config(model: str, row: Any, seq_len: int, batch_size: int) -> Config:
    """The config of a plan row's chosen layout (`anychip plan ... --verify`)."""
    lay = row.layout
    overrides = [f"train.seq_len={seq_len}", f"train.batch_size={batch_size}", f"train.grad_accum={lay.grad_accum}",
                 f"compute.remat={lay.remat}", f"mesh.data={lay.data}", f"mesh.fsdp={lay.fsdp}",
                 f"mesh.tensor={lay.tensor}"]
    if str(model).endswith((".yaml", ".yml")):
        return load_config(model, overrides)
    return load_config(None, [f"model={model}", *overrides])


def verify_plan_row(model: str, row: Any, seq_len: int, batch_size: int) -> str:
    """One line: the plan row's layout compiled on its chip, e.g. 'compiled: 61.2 of 95.7 GB per device'.

    Per device like the row's memory (a TPU7x chip is two devices sharing its HBM).
    """
    name = f"{row.chip} x{row.n_chips} ({row.layout}, remat {row.layout.remat}, accum {row.layout.grad_accum})"
    if row.chip not in TPU_GENERATIONS and row.chip not in GPU_SPECS:
        return f"{name}: not verified: no compiler for {row.chip} here (TPU: {', '.join(TPU_GENERATIONS)}; " \
               f"GPU: {', '.join(GPU_SPECS)})"
    r = compile_step(plan_config(model, row, seq_len, batch_size), Target(row.chip, row.n_chips,
                                                                          parse_target(f"{row.chip}:1").platform))
    if r.error:
        return f"{name}: {r.error}"
    return (f"{name}: compiled: {r.peak_bytes / 1e9:.1f} of {r.hbm_bytes / 1e9:.1f} GB per device on "
            f"{r.devices} devices{'' if r.fits else ' (DOES NOT FIT)'}; planner {row.memory_bytes / 1e9:.1f} GB; "
            f"{r.compile_s:.0f} s")

"""Per-device memory of this run's train step: the planner's estimate before compiling, XLA's own
analysis after it, the device's capacity, and `train.auto_fit`, which picks the microbatch
(train.grad_accum) and the remat policy (compute.remat) so the step fits.

The estimate is `step_model.memory_per_device` for this run's mesh (one model of memory in the code
base, not two); its fp32 "states" (16 B per local parameter, +4 B for the gradient accumulator) are
shown split as params 4 B, grads 4 (+4) B and AdamW moments 8 B. XLA's analysis after compiling
is the truth on the backend at hand; the two are printed side by side so a bad estimate shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp

from anychip.config import Config
from anychip.config import replace as replace_config
from anychip.cost import calibration, hardware, step_model
from anychip.errors import UserError
from anychip.model.attention import kernel_for
from anychip.parallel.mesh import mesh_shape

GiB = 2**30


def device_memory() -> tuple[float | None, str]:
    """(bytes one device may use, where that number came from), or (None, why it is unknown)."""
    device = jax.local_devices()[0]  # memory_stats() answers for this process's own devices only
    stats = device.memory_stats() or {}  # GPU and TPU report the allocator's limit; CPU reports nothing
    if stats.get("bytes_limit"):
        return float(stats["bytes_limit"]), "the device's memory_stats()"
    chip = hardware.detect()
    if chip.hbm_bytes:
        return chip.hbm_bytes / chip.devices_per_chip, f"the catalog ({chip.name})"
    return None, f"{device.device_kind} reports no memory limit and has no memory size in the catalog"


def _job_layout(cfg: Config, mesh: dict[str, int]) -> tuple[step_model.Job, step_model.Layout, str]:
    t, c = cfg.train, cfg.compute_for(jax.default_backend())
    job = step_model.Job(cfg.model, 1, t.seq_len, t.batch_size, 4 if c.dtype == "float32" else 2, c.loss_chunk,
                         c.attention_block)
    remat = "dots" if c.remat == "dots_no_batch" else c.remat  # the planner models none / dots / full
    layout = step_model.Layout(mesh["data"], mesh["fsdp"], mesh["tensor"], t.grad_accum, remat)
    kernel = kernel_for(c.attention, c.dtype)
    attention = "flash" if kernel == "cudnn" else kernel  # the planner's attention kinds: xla, blockwise, flash, splash
    return job, layout, attention


def estimate(cfg: Config, mesh: dict[str, int]) -> dict[str, float]:
    """Predicted peak bytes per device by part: params, grads, optimizer, activations (and transients)."""
    job, layout, attention = _job_layout(cfg, mesh)
    parts = step_model.memory_per_device(job, layout, attention)
    p = step_model.local_params(cfg.model, layout.fsdp, layout.tensor)
    return {
        "params": 4 * p, "grads": (8 if layout.grad_accum > 1 else 4) * p, "optimizer": 8 * p,
        "activations": parts["activations"] + parts["weight_casts"] + parts["gathered"],
        "total": parts["total"],
    }


def human(n: float) -> str:
    """Bytes in binary units: '1.50 GiB', '12.0 MiB', '512 B'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit in ("TiB", "GiB") else f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def format_estimate(parts: dict[str, float]) -> str:
    named = ", ".join(f"{k} {human(parts[k])}" for k in ("params", "grads", "optimizer", "activations"))
    return f"estimated memory per device (planner): {named}; total {human(parts['total'])}"


def xla_peak_bytes(compiled: Any) -> tuple[float | None, str]:
    """(peak bytes per device, a one-line summary) from XLA's memory analysis of a compiled step."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):  # backends may not implement it
        m = None
    if m is None:
        return None, "XLA memory analysis: not available on this backend"
    # Donated state buffers are both an argument and an output (alias): count them once.
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return peak, (f"XLA memory analysis per device: arguments {human(m.argument_size_in_bytes)}, outputs "
                  f"{human(m.output_size_in_bytes)} ({human(m.alias_size_in_bytes)} of them donated), "
                  f"temporaries {human(m.temp_size_in_bytes)}; peak {human(peak)}")


def check_fits(peak: float | None, log: Callable[[str], None]) -> None:
    capacity, _ = device_memory()
    if peak is not None and capacity is not None and peak > capacity:
        log(f"warning: XLA needs {human(peak)} per device but it has {human(capacity)}; set "
            "train.auto_fit=true, more train.grad_accum, compute.remat=full, or more fsdp devices")


def _candidates(cfg: Config, mesh: dict[str, int], budget: float) -> list[step_model.Layout]:
    """For each remat policy, the fewest microbatches (largest microbatch) that fits `budget`."""
    job, base, attention = _job_layout(cfg, mesh)
    rows = cfg.train.batch_size // (mesh["data"] * mesh["fsdp"])  # sequences per batch shard
    fits = []
    for remat in step_model.REMATS:
        for accum in (d for d in range(1, rows + 1) if rows % d == 0):
            layout = replace(base, remat=remat, grad_accum=accum)
            if step_model.memory_per_device(job, layout, attention)["total"] <= budget:
                fits.append(layout)
                break  # more microbatches than needed only add passes over the weights
    return fits


def auto_fit(cfg: Config, n_devices: int, log: Callable[[str], None]) -> Config:
    """`train.auto_fit`: the config with the grad_accum and remat the planner expects to run fastest
    within device memory; unchanged (with a message) where the device's memory is unknown."""
    capacity, source = device_memory()
    if capacity is None:
        log(f"train.auto_fit: skipped, {source}; keeping grad_accum={cfg.train.grad_accum}, "
            f"remat={cfg.compute.remat}")
        return cfg
    mesh = dict(zip(("data", "fsdp", "tensor"), mesh_shape(cfg.mesh, n_devices)))
    fits = _candidates(cfg, mesh, step_model.HBM_USABLE * capacity)
    if not fits:
        rows = cfg.train.batch_size // (mesh["data"] * mesh["fsdp"])
        need = estimate(replace_config(cfg, train={"grad_accum": rows}, compute={"remat": "full"}), mesh)["total"]
        raise UserError(f"train.auto_fit: nothing fits in {capacity / GiB:.1f} GiB per device ({source}): "
                        f"even remat=full with one sequence per microbatch needs {need / GiB:.1f} GiB; use "
                        "more devices (mesh.fsdp), a shorter train.seq_len or a smaller model")
    ranked = [_with_layout(cfg, layout) for layout in _ranked(cfg, fits, n_devices)]
    if n_devices == jax.device_count():  # the local devices are the target: ask their compiler
        best = _first_compiled_fit(ranked, capacity, log)
    else:
        best = ranked[0]
    log(f"train.auto_fit: grad_accum={best.train.grad_accum}, remat={best.compute.remat} (fits "
        f"{capacity / GiB:.1f} GiB per device, from {source})")
    return best


def _with_layout(cfg: Config, layout: step_model.Layout) -> Config:
    return replace_config(cfg, train={"grad_accum": layout.grad_accum}, compute={"remat": layout.remat})


def _ranked(cfg: Config, fits: list[step_model.Layout], n_devices: int) -> list[step_model.Layout]:
    """The candidates, fastest first by the planner's step-time model; least remat first where it cannot rank."""
    chip = hardware.detect()
    if not chip.peak_bf16_flops:
        return fits
    job, _, _ = _job_layout(cfg, {"data": 1, "fsdp": 1, "tensor": 1})
    sustained, _, _ = calibration.sustained(chip, {}, cfg.model)  # the planner's default for this chip
    times = [step_model.step_time(job, chip, n_devices, layout, sustained)["step"] for layout in fits]
    if not all(map(math.isfinite, times)):  # e.g. no bandwidth figures for this chip
        return fits
    return [fits[i] for i in sorted(range(len(fits)), key=lambda i: (times[i], i))]


def compiled_peak(cfg: Config) -> float | None:
    """XLA's peak bytes per device of `cfg`'s train step compiled for this process's devices (not run)."""
    from anychip.parallel.mesh import batch_sharding
    from anychip.train.step import abstract_state, build_trainer

    trainer = build_trainer(cfg)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1), jnp.int32,
                                 sharding=batch_sharding(trainer.mesh))
    return xla_peak_bytes(trainer.step.lower(abstract_state(trainer), batch).compile())[0]


def _first_compiled_fit(ranked: list[Config], capacity: float, log: Callable[[str], None]) -> Config:
    """The first candidate whose compiled step fits `capacity` (the planner's pick, unless the compiler
    disagrees); the compile lands in the persistent cache, so training reuses it."""
    for cfg in ranked:
        peak = compiled_peak(cfg)
        where = f"grad_accum={cfg.train.grad_accum}, remat={cfg.compute.remat}"
        if peak is None:
            log(f"train.auto_fit: {where}: the compiler reports no memory analysis; trusting the planner")
            return cfg
        log(f"train.auto_fit: {where}: compiled: {peak / 1e9:.1f} of {capacity / 1e9:.1f} GB per device")
        if peak <= capacity:
            return cfg
    raise UserError(f"train.auto_fit: the planner's candidates all compile to more than {capacity / GiB:.1f} GiB "
                    "per device; use more devices (mesh.fsdp), a shorter train.seq_len or a smaller model")

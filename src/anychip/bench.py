"""`anychip bench`: steady-state speed of the configured train step on the current backend.

Measures compile time, then runs `warmup` steps (not timed: first executions pay allocation and
autotuning), then `steps` timed steps with one host sync at the end, so the number is the
device's throughput and not the host's dispatch latency. Batches are random tokens already on the
device: the data loader is not what is measured (the loop prefetches while the device computes).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from anychip import hardware, sharding
from anychip.config import Config, to_dict
from anychip.metrics import flops_per_token, mfu
from anychip.train import build_trainer


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on device 0 since start, where the backend reports it (GPU, TPU; not CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_bench(cfg: Config, steps: int = 10, warmup: int = 3) -> dict[str, Any]:
    """Returns one record (the schema `planner --calibration` reads)."""
    trainer = build_trainer(cfg)
    t = cfg.train
    state = trainer.init(jax.random.key(t.seed))
    keys = jax.random.split(jax.random.key(1), 2)
    batches = [
        jax.device_put(jax.random.randint(k, (t.batch_size, t.seq_len + 1), 0, cfg.model.vocab_size, jnp.int32),
                       sharding.batch_sharding(trainer.mesh))
        for k in keys
    ]
    t0 = time.perf_counter()
    step = trainer.step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
        state, metrics = step(state, batches[i % 2])
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    step_time = (time.perf_counter() - t0) / steps
    chip = hardware.detect()
    tokens_per_s = t.batch_size * t.seq_len / step_time
    flops_token = flops_per_token(cfg.model, t.seq_len)
    return {
        "chip": chip.key, "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "n_devices": jax.device_count(), "model": to_dict(cfg.model), "seq_len": t.seq_len,
        "batch_size": t.batch_size, "grad_accum": t.grad_accum, "mesh": dict(trainer.mesh.shape),
        "remat": t.remat, "attention": t.attention, "compute_dtype": t.compute_dtype,
        "compile_time_s": compile_s, "step_time_s": step_time, "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_token,
        "mfu": mfu(tokens_per_s, flops_token, chip.peak_flops_per_device, jax.device_count()),
        "peak_memory_bytes": peak_memory_bytes(), "final_loss": float(metrics["loss"]),
        "jax": jax.__version__, "python": platform.python_version(), "steps": steps, "warmup": warmup,
    }


def format_record(record: dict[str, Any]) -> str:
    mem = record["peak_memory_bytes"]
    rows = [
        ("model", f"{record['model']['name']} ({record['model']['n_layers']}L, d={record['model']['d_model']})"),
        ("device", f"{record['n_devices']} x {record['device_kind']} ({record['backend']})"),
        ("batch x seq", f"{record['batch_size']} x {record['seq_len']}"),
        ("remat / attention", f"{record['remat']} / {record['attention']}"),
        ("compile time", f"{record['compile_time_s']:.1f} s"),
        ("step time", f"{1000 * record['step_time_s']:.1f} ms"),
        ("tokens/s", f"{record['tokens_per_s']:,.0f}"),
        ("MFU", "n/a (no catalog peak for this device)" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"),
        ("peak memory", "n/a on this backend" if mem is None else f"{mem / 2**30:.2f} GiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_record(record: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2) + "\n")

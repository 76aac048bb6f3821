"""`anychip bench`: steady-state speed of the configured train step on the current backend.

Measures compile time, then runs `warmup` steps (not timed: first executions pay allocation and
autotuning), then `steps` timed steps with one host sync at the end, so the number is the
device's throughput and not the host's dispatch latency. Batches are random tokens already on the
device: the data loader is not what is measured (the loop prefetches while the device computes).

`profile` then traces a few more steps with `jax.profiler` (a Perfetto/TensorBoard trace) and sums the
device time per operation into kinds (matmul, attention, collective, copy, other fusions): the
profile-backed answer to "where does the step time go".
"""

from __future__ import annotations

import collections
import gzip
import json
import platform
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib

from anychip.config import Config
from anychip.cost import hardware
from anychip.cost.calibration import BenchRecord
from anychip.errors import require
from anychip.files import write_text_atomic
from anychip.model.flops import flops_per_token
from anychip.parallel import mesh as sharding
from anychip.train.step import build_trainer, model_kwargs


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on device 0 since start, where the backend reports it (GPU, TPU; not CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_bench(cfg: Config, steps: int = 10, warmup: int = 3,
              profile_dir: str | Path | None = None) -> BenchRecord:
    """The measured record (what `plan --calibration` reads); with `profile_dir`, also a trace of 3 more
    steps there and the record's `profile` summary (see `summarize_trace`)."""
    require(steps >= 1 and warmup >= 0, f"bench needs steps >= 1 and warmup >= 0, got {steps} and {warmup}")
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
    profile = None
    if profile_dir is not None:
        with jax.profiler.trace(str(profile_dir), create_perfetto_trace=True):
            for i in range(3):
                state, metrics = step(state, batches[i % 2])
            jax.block_until_ready((state, metrics))
        profile = summarize_trace(newest_trace(profile_dir), steps=3)
    chip = hardware.detect()
    tokens_per_s = t.batch_size * t.seq_len / step_time
    flops_token = flops_per_token(cfg.model, t.seq_len)
    c = cfg.compute_for(jax.default_backend())
    return BenchRecord(
        chip=chip.key, device_kind=jax.devices()[0].device_kind, backend=jax.default_backend(),
        n_devices=jax.device_count(), model=cfg.model, seq_len=t.seq_len, batch_size=t.batch_size,
        grad_accum=t.grad_accum, mesh=dict(trainer.mesh.shape), remat=c.remat,
        attention=model_kwargs(cfg)["attention_impl"], compute_dtype=c.dtype, loss_chunk=c.loss_chunk,
        compile_time_s=compile_s, step_time_s=step_time, tokens_per_s=tokens_per_s, flops_per_token=flops_token,
        mfu=hardware.mfu(tokens_per_s, flops_token, chip.peak_flops_per_device, jax.device_count()),
        peak_memory_bytes=peak_memory_bytes(), final_loss=float(metrics["loss"]), jax=jax.__version__,
        jaxlib=jaxlib.__version__, python=platform.python_version(),
        platform_version=str(getattr(jax.devices()[0].client, "platform_version", "")),  # e.g. CUDA's version
        steps=steps, warmup=warmup, profile=profile,
    )


# Kinds of device operations, by name: cuBLAS/CUTLASS kernels and XLA dot fusions; cuDNN or XLA attention;
# NCCL and XLA collectives; copies. The first matching kind wins; the rest are "other" (elementwise and
# reduction fusions, the optimizer, the loss).
OP_KINDS = [
    ("attention", re.compile(r"cudnn|fmha|flash|sdpa|attention", re.IGNORECASE)),
    ("matmul", re.compile(r"gemm|xmma|nvjet|cublas|cutlass|\bdot|dot[._]|matmul|ynn_fusion|wgmma|sm\d+_",
                          re.IGNORECASE)),
    ("collective", re.compile(r"nccl|all-reduce|all-gather|reduce-scatter|all_reduce|all_gather|collective",
                              re.IGNORECASE)),
    ("copy", re.compile(r"memcpy|memset|copy|transpose", re.IGNORECASE)),
]


def newest_trace(profile_dir: str | Path) -> Path:
    traces = Path(profile_dir).glob("plugins/profile/*/perfetto_trace.json.gz")
    return max(traces, key=lambda p: p.stat().st_mtime)


def summarize_trace(path: Path, steps: int, top: int = 15) -> dict[str, Any]:
    """Device time per operation and per kind in a Perfetto trace, per step.

    GPU/TPU traces have device processes ("/device:GPU:0"), whose events are the kernels; on CPU the ops
    run on XLA's own threads (named "tf_XLA..."), where runtime wrappers ("Class::Method") and "end: op"
    markers are left out. Only innermost events count: a loop's span is the sum of its body's ops.
    """
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    on_device = {pid for pid, name in processes.items() if name.startswith("/device:")}

    def counted(e: dict[str, Any]) -> bool:
        if on_device:
            return e["pid"] in on_device
        return (threads.get((e["pid"], e.get("tid")), "").startswith("tf_XLA") and "::" not in e["name"]
                and not e["name"].startswith("end: "))

    per_op: collections.Counter[str] = collections.Counter()
    for e in _leaves([e for e in events if e.get("ph") == "X" and counted(e)]):
        per_op[e["name"]] += e.get("dur", 0.0) / 1e3 / steps  # µs → ms per step
    per_kind: collections.Counter[str] = collections.Counter()
    for name, ms in per_op.items():
        per_kind[next((kind for kind, pattern in OP_KINDS if pattern.search(name)), "other")] += ms
    total = sum(per_op.values())
    return {"trace": str(path), "device_ms_per_step": total, "source": "device" if on_device else "host threads",
            "kinds": {k: {"ms": v, "share": v / total} for k, v in per_kind.most_common()},
            "top_ops": [{"name": n, "ms": v, "share": v / total} for n, v in per_op.most_common(top)]}


def _leaves(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events that contain no other event of their thread: a loop's (while) span is its body's ops."""
    ordered = sorted(events, key=lambda e: (e["pid"], e.get("tid"), e["ts"], -e.get("dur", 0.0)))

    def contains(e: dict[str, Any], nxt: dict[str, Any] | None) -> bool:
        return (nxt is not None and (nxt["pid"], nxt.get("tid")) == (e["pid"], e.get("tid"))
                and nxt["ts"] + nxt.get("dur", 0.0) <= e["ts"] + e.get("dur", 0.0))

    return [e for e, nxt in zip(ordered, ordered[1:] + [None]) if not contains(e, nxt)]


def format_profile(profile: dict[str, Any]) -> str:
    lines = [(f"device time per step: {profile['device_ms_per_step']:.1f} ms ({profile['source']}); "
              f"trace: {profile['trace']}")]
    lines += [f"  {kind:<12}{row['ms']:>9.2f} ms {100 * row['share']:>5.1f}%"
              for kind, row in profile["kinds"].items()]
    lines.append("top operations:")
    lines += [f"  {row['ms']:>9.2f} ms {100 * row['share']:>5.1f}%  {row['name'][:90]}"
              for row in profile["top_ops"]]
    return "\n".join(lines)


def format_record(r: BenchRecord) -> str:
    mem = r.peak_memory_bytes
    rows = [
        ("model", f"{r.model.name} ({r.model.n_layers}L, d={r.model.d_model})"),
        ("device", f"{r.n_devices} x {r.device_kind} ({r.backend})"),
        ("batch x seq", f"{r.batch_size} x {r.seq_len}"),
        ("remat / attention", f"{r.remat} / {r.attention}"),
        ("loss", "full logits" if not r.loss_chunk else f"fused, chunks of {r.loss_chunk}"),
        ("compile time", f"{r.compile_time_s:.1f} s"),
        ("step time", f"{1000 * r.step_time_s:.1f} ms"),
        ("tokens/s", f"{r.tokens_per_s:,.0f}"),
        ("MFU", "n/a (no catalog peak for this device)" if r.mfu is None else f"{100 * r.mfu:.1f}%"),
        ("peak memory", "n/a on this backend" if mem is None else f"{mem / 2**30:.2f} GiB"),
        ("software", f"jax {r.jax}, jaxlib {r.jaxlib}, {r.platform_version or 'n/a'}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_record(record: BenchRecord, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record.to_json(), indent=2) + "\n")

"""Per-device memory of the train step under each attention kernel, compiled by libtpu for a TPU slice this
machine does not have (compile-only devices from `jax.experimental.topologies`), next to the planner.

    /work/venv-aot/bin/python benchmarks/attention_memory.py                      # 350m, 16×4096, v5p:8
    /work/venv-aot/bin/python benchmarks/attention_memory.py --model tiny --seq-len 512 --batch-size 8

Needs libtpu (the `aot` extra). `compile_for_tpu` is a small local stand-in for `anychip check --compile`
(check/compile.py on the ground-truth branch), to be replaced by it once merged.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import jax
import jax.numpy as jnp

from anychip.check.portability import for_platform
from anychip.config import load_config
from anychip.parallel import mesh as sharding
from anychip.train import memory
from anychip.train.step import abstract_state, build_trainer

GiB = 2**30
V5P = {4: "2x2x1", 8: "2x2x2"}  # v5p slices of 4 and 8 chips (3-D torus), one device per chip (megacore)


def tpu_devices(chips: int) -> list:
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: touches no chip
    shape = V5P[chips]
    host = tuple(int(x) for x in shape.split("x"))
    topo = topologies.get_topology_desc(platform="tpu", topology_name=f"v5p:{shape}", chip_config_name="megacore",
                                        chips_per_host_bounds=host)
    return list(topo.devices)


def compile_for_tpu(overrides: list[str], chips: int) -> dict:
    """Compile the train step of `overrides` for a v5p slice: peak bytes per device (or the OOM's figure)."""
    cfg = for_platform(load_config(None, overrides), "tpu")
    mesh = sharding.make_mesh(cfg.mesh, tpu_devices(chips))
    trainer = build_trainer(cfg, mesh)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1), jnp.int32,
                                 sharding=sharding.batch_sharding(mesh))
    planner = memory.estimate(cfg, dict(mesh.shape))["total"]
    start = time.perf_counter()
    row = {"attention": cfg.compute.attention, "mesh": dict(mesh.shape), "planner_gib": planner / GiB}
    try:
        lowered = trainer.step.lower(abstract_state(trainer), batch)
        row["tpu_custom_calls"] = lowered.as_text().count("tpu_custom_call")
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        m = re.search(r"Used ([\d.]+)([KMG]) of ([\d.]+)([KMG]) hbm", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not m:
            raise
        scale = {"K": 2**-20, "M": 2**-10, "G": 1}
        return {**row, "fits": False, "peak_gib": float(m.group(1)) * scale[m.group(2)],
                "hbm_gib": float(m.group(3)) * scale[m.group(4)], "compile_s": time.perf_counter() - start}
    peak, _ = memory.xla_peak_bytes(compiled)
    return {**row, "fits": True, "peak_gib": peak / GiB, "temp_gib": compiled.memory_analysis().temp_size_in_bytes / GiB,
            "compile_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="350m")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--remat", default="dots")
    parser.add_argument("--chips", type=int, default=8, choices=sorted(V5P))
    parser.add_argument("--kernels", default="xla,auto")
    args = parser.parse_args()
    for kernel in args.kernels.split(","):
        overrides = [f"model={args.model}", f"train.seq_len={args.seq_len}", f"train.batch_size={args.batch_size}",
                     f"compute.remat={args.remat}", f"compute.attention={kernel}"]
        print(json.dumps({"kernel": kernel, **compile_for_tpu(overrides, args.chips)}), flush=True)


if __name__ == "__main__":
    main()

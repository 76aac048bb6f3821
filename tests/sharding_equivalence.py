"""Helper of test_sharding.py, run in a subprocess with 8 CPU devices (XLA_FLAGS must be set before jax
is imported, and the rest of the suite runs on one device). Prints one JSON line:

  meshes: for each mesh, the loss difference and the largest per-tensor gradient error
          max|g - g_ref| / max|g_ref| against the same batch on one device, plus the param specs;
  init:   XLA's memory analysis of the sharded initialisation under fsdp=8, and the bytes of all params.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from anychip.config import MeshConfig, load_config, replace
from anychip.model.params import init_params
from anychip.parallel import mesh as sharding
from anychip.train.step import build_trainer, grads_and_loss

jax.config.update("jax_default_matmul_precision", "highest")

# (name, mesh, config overrides): grad_accum checks the microbatch split under sharding; loss_chunk the fused
# cross-entropy with the vocabulary split over tensor, against the reference path on one device.
MESHES = [("data=8", MeshConfig(8, 1, 1), {}), ("fsdp=8", MeshConfig(1, 8, 1), {}),
          ("fsdp=4,tensor=2", MeshConfig(1, 4, 2), {}),
          ("data=2,fsdp=2,tensor=2", MeshConfig(2, 2, 2), {"train": {"grad_accum": 2}}),
          ("fsdp=4,tensor=2,loss_chunk=8", MeshConfig(1, 4, 2),
           {"train": {"grad_accum": 2}, "compute": {"loss_chunk": 8}})]


def grads(cfg, mesh, params, tokens):
    trainer = build_trainer(cfg, mesh)
    p_shard, b_shard = trainer.state_shardings.params, sharding.batch_sharding(mesh)
    fn = jax.jit(sharding.with_activation_sharding(lambda p, b: grads_and_loss(p, b, cfg), mesh),
                 in_shardings=(p_shard, b_shard), out_shardings=(p_shard, sharding.replicated(mesh)))
    g, ce = fn(jax.device_put(params, p_shard), jax.device_put(tokens, b_shard))
    specs = {k: str(v.spec) for k, v in p_shard["layers"].items()} | {"embed": str(p_shard["embed"].spec)}
    return jax.tree.map(np.asarray, g), float(ce), specs


def init_memory(cfg):
    trainer = build_trainer(cfg, sharding.make_mesh(MeshConfig(1, 8, 1)))
    m = trainer.init.lower(jax.random.key(0)).compile().memory_analysis()
    params = jax.eval_shape(trainer.init, jax.random.key(0)).params
    return {"temp": m.temp_size_in_bytes, "output": m.output_size_in_bytes,
            "param_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))}


def data_shards() -> dict[str, list[int]]:
    """Rows each half of the devices (a stand-in for 2 processes × 4 devices) reads, per mesh."""
    devices = jax.devices()
    halves = {"first": set(devices[:4]), "second": set(devices[4:])}
    return {f"{name}/{half}": list(sharding.data_shard(sharding.make_mesh(mesh_cfg), 16, mine))
            for name, mesh_cfg in [("data=2,fsdp=2,tensor=2", MeshConfig(2, 2, 2)), ("tensor=8", MeshConfig(1, 1, 8)),
                                   ("fsdp=2,tensor=4", MeshConfig(1, 2, 4))]
            for half, mine in halves.items()}


def main() -> None:
    cfg = load_config(None, ["model=tiny", "compute.dtype=float32", "train.batch_size=16",
                             "train.seq_len=32", *sys.argv[1:]])
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (16, 33), 0, cfg.model.vocab_size, jnp.int32))
    params = jax.device_get(init_params(cfg.model, jax.random.key(0)))
    ref, ce_ref, _ = grads(cfg, sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]), params, tokens)
    out, ref = {}, jax.tree.leaves(ref)
    for name, mesh_cfg, overrides in MESHES:
        mesh = sharding.make_mesh(mesh_cfg)
        g, ce, specs = grads(replace(cfg, **overrides), mesh, params, tokens)
        errors = [float(np.max(np.abs(x - y)) / np.max(np.abs(y))) for x, y in zip(jax.tree.leaves(g), ref)]
        out[name] = {"loss_diff": abs(ce - ce_ref), "grad_error": max(errors), "specs": specs}
    print(json.dumps({"devices": jax.device_count(), "meshes": out, "init": init_memory(cfg),
                      "data_shard": data_shards()}))


if __name__ == "__main__":
    main()

"""Helper of test_work_split.py, run in a subprocess with 8 CPU devices (XLA_FLAGS must be set before jax
is imported). Compiles, for one device and for each mesh of 8, the programs that must split their work:

  train:      the train step (reference loss), with the layer scan unrolled so XLA counts every layer;
  fused_loss: the train step with compute.loss_chunk (the chunked unembedding + cross-entropy);
  eval:       the eval loss;
  generate:   a KV-cache prefill (model/decoder.cached_hidden_states + the unembedding).

Prints one JSON line: {mesh: {program: {"flops": per device, "temp": temporary bytes per device}}}. With
`--quick` (the default suite) the train step on every mesh, eval and generation on one device and the
default mesh (fsdp=8); without it, every program on every mesh (the slow test).
Nothing is run, only compiled: the numbers are XLA's cost_analysis() and memory_analysis().
"""

import json
import os
import sys

# No LLVM optimisation: buffer assignment and the cost analysis are made on the HLO before code generation, so
# the numbers are the same (checked) and each compile takes half the time.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (" --xla_force_host_platform_device_count=8"
                                                             " --xla_backend_optimization_level=0"
                                                             " --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from anychip.config import MeshConfig, load_config, replace
from anychip.model.decoder import cached_hidden_states, init_cache, unembed
from anychip.parallel import mesh as sharding
from anychip.train.step import abstract_state, build_trainer

MESHES = {"one": MeshConfig(1, 1, 1), "data=8": MeshConfig(8, 1, 1), "fsdp=8": MeshConfig(1, 8, 1),
          "fsdp=4,tensor=2": MeshConfig(1, 4, 2), "data=2,fsdp=2,tensor=2": MeshConfig(2, 2, 2)}
B, T = 16, 128


def _numbers(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per program
    return {"flops": float(cost["flops"]), "temp": float(compiled.memory_analysis().temp_size_in_bytes)}


def _prefill(trainer, mesh) -> dict[str, float]:
    cfg = trainer.cfg.model
    batch = sharding.batch_sharding(mesh)  # (B, T): rows over data × fsdp
    # The cache (L, B, KV, S, hd) split like the activations that fill it: rows, then kv heads over tensor.
    cache_shard = NamedSharding(mesh, sharding.spec_for(("layers", "batch", "kv_heads", "seq", "head_dim"),
                                                        (cfg.n_layers, B, cfg.n_kv_heads, T, cfg.head_dim),
                                                        mesh, {**sharding.ACTIVATION_RULES, "layers": None}))

    def prefill(params, tokens, positions, cache):
        h, cache = cached_hidden_states(params, tokens, positions, cache, cfg, unroll=True)
        return unembed(params, h, cfg), cache  # (B, T, V)

    fn = jax.jit(sharding.with_activation_sharding(prefill, mesh),
                 in_shardings=(trainer.state_shardings.params, batch, batch, cache_shard))
    params = abstract_state(trainer).params
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    cache = jax.eval_shape(lambda: init_cache(cfg, B, T))
    return _numbers(fn.lower(params, tokens, tokens, cache).compile())


def programs(cfg, mesh, which: set[str]) -> dict[str, dict[str, float]]:
    trainer = build_trainer(cfg, mesh)
    state, batch = abstract_state(trainer), jax.ShapeDtypeStruct((B, T + 1), jnp.int32)
    out = {"train": _numbers(trainer.step.lower(state, batch).compile())}
    if "fused_loss" in which:
        fused = build_trainer(replace(cfg, compute={"loss_chunk": 32}), mesh)
        out["fused_loss"] = _numbers(fused.step.lower(abstract_state(fused), batch).compile())
    if "eval" in which:
        out["eval"] = _numbers(trainer.eval_loss.lower(state.params, batch).compile())
    if "generate" in which:
        out["generate"] = _prefill(trainer, mesh)
    return out


def main() -> None:
    cfg = load_config(None, ["model=tiny", "compute.dtype=float32", f"train.batch_size={B}", f"train.seq_len={T}",
                             "compute.layers=unroll", "compute.loss_chunk=0", "compute.compile_cache_dir=null"])
    quick, out = "--quick" in sys.argv, {}
    for name, mesh_cfg in MESHES.items():
        devices = jax.devices()[: mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor]
        which = {"fused_loss", "eval", "generate"}
        if quick:
            which = {"eval", "generate"} if name in ("one", "fsdp=8") else set()
        out[name] = programs(cfg, sharding.make_mesh(mesh_cfg, devices), which)
    print(json.dumps({"devices": jax.device_count(), "meshes": out}))


if __name__ == "__main__":
    main()

"""Mesh, logical-axis rules, process start-up and the memory helpers (in process, one device), and the
equivalence of sharded and single-device steps on 8 CPU devices (a subprocess, because XLA_FLAGS must be
set before jax is imported and the rest of the suite runs on one device).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from anychip.config import MODEL_PRESETS, DistributedConfig, MeshConfig, load_config
from anychip.errors import UserError
from anychip.model.params import param_axes, param_shapes
from anychip.parallel import distributed
from anychip.parallel import mesh as sharding
from anychip.train import memory

HERE = Path(__file__).parent

# Tolerances for fp32 compute at "highest" matmul precision. The sharded and single-device programs
# do the same arithmetic in another order: partial sums per shard, then all-reduces. fp32 round-off
# is eps = 1.2e-7 per operation; the largest sums here run over B·T = 512 tokens (weight gradients),
# so reordering moves a result by ~sqrt(512)·eps ≈ 3e-6 of its magnitude typically and 512·eps ≈ 6e-5
# at worst. Measured: 1.1e-6 (gradients, relative to each tensor's largest entry) and 5e-7 (loss,
# absolute, ~1 ulp of 6.2). A sharding bug (a missing all-reduce, a wrong slice of the batch, a
# double-counted shard) errs by 1e-2 to 1e0, far outside these bounds.
GRAD_TOL = 2e-5
LOSS_TOL = 1e-5

MESHES = ["data=8", "fsdp=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2,loss_chunk=8"]


@pytest.fixture(scope="module")
def eight_devices():
    """Run tests/sharding_equivalence.py once for the whole module: (its JSON result, its stderr)."""
    cmd = [sys.executable, str(HERE / "sharding_equivalence.py")]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    return result, r.stderr


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_loss_and_gradients_match_one_device(eight_devices, mesh):
    got = eight_devices[0]["meshes"][mesh]
    assert got["loss_diff"] < LOSS_TOL
    assert got["grad_error"] < GRAD_TOL


def test_fsdp_and_tensor_parallel_layout(eight_devices):
    specs = eight_devices[0]["meshes"]["fsdp=4,tensor=2"]["specs"]
    # Megatron: q/k/v and gate/up split their output (heads, mlp) over tensor, wo and w_down their input;
    # FSDP splits every matrix's embed axis; norms are replicated.
    assert specs["wq"] == "P(None, 'fsdp', 'tensor', None)"
    assert specs["wo"] == "P(None, 'tensor', None, 'fsdp')"
    assert specs["w_gate"] == "P(None, 'fsdp', 'tensor')"
    assert specs["w_down"] == "P(None, 'tensor', 'fsdp')"
    assert specs["embed"] == "P('tensor', 'fsdp')"
    assert specs["attn_norm"] == "P(None, None)"
    replicated = {"P(None, None)", "P(None, None, None)", "P(None, None, None, None)"}
    assert set(eight_devices[0]["meshes"]["data=8"]["specs"].values()) <= replicated  # plain data parallel


def test_partitioner_never_falls_back_to_replicating(eight_devices):
    # XLA warns when it cannot move between two shardings and all-gathers the whole tensor instead;
    # the activation rules exist to keep it from happening (e.g. at the embedding lookup).
    assert "Involuntary full rematerialization" not in eight_devices[1]


def test_sharded_init_never_holds_all_params_on_one_device(eight_devices):
    init = eight_devices[0]["init"]
    # params + AdamW m, v are 3× the param bytes; each of 8 devices holds 1/8 of them (norms replicated).
    assert init["output"] < 3 * init["param_bytes"] / 8 * 1.05
    # The random init is generated shard by shard: no device ever materialises the full parameter set.
    assert init["temp"] < init["param_bytes"] / 2


def test_each_process_reads_the_rows_its_devices_hold(eight_devices):
    shards = eight_devices[0]["data_shard"]
    # Batch axes split across the two "processes": each reads its half (TokenDataset's process slice).
    assert shards["data=2,fsdp=2,tensor=2/first"] == [0, 2] and shards["data=2,fsdp=2,tensor=2/second"] == [1, 2]
    assert shards["fsdp=2,tensor=4/second"] == [1, 2]
    # A tensor axis across processes (one process per GPU, tensor=8): both need every row.
    assert shards["tensor=8/first"] == shards["tensor=8/second"] == [0, 1]


# ---------------------------------------------------------------------------------------------
# Rules (AbstractMesh: no devices needed)


def test_mesh_shape_resolves_the_remaining_devices():
    assert sharding.mesh_shape(MeshConfig(1, -1, 1), 8) == (1, 8, 1)
    assert sharding.mesh_shape(MeshConfig(2, 2, -1), 8) == (2, 2, 2)
    with pytest.raises(UserError, match="does not divide"):
        sharding.mesh_shape(MeshConfig(3, -1, 1), 8)
    with pytest.raises(UserError, match="but there are 8 devices"):
        sharding.mesh_shape(MeshConfig(2, 2, 1), 8)


def test_every_matrix_of_7b_is_split_over_fsdp_and_tensor():
    cfg, mesh = MODEL_PRESETS["7b"], sharding.abstract_mesh(MeshConfig(2, 16, 8), 256)
    specs = jax.tree.map(lambda a, s: (a, sharding.logical_to_spec(a, s, mesh)), param_axes(cfg),
                         param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    for axes, spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[1], P)):
        if "norm" in axes:
            assert all(s is None for s in spec)
        else:  # ZeRO-3: no full copy of any matrix on a device; Megatron on the head / MLP / vocab axis
            assert "fsdp" in spec and "tensor" in spec and "data" not in spec, (axes, spec)


def test_activation_rules_and_fallbacks():
    mesh = sharding.abstract_mesh(MeshConfig(2, 4, 2), 16)
    def spec(axes, shape):
        return sharding.spec_for(axes, shape, mesh, sharding.ACTIVATION_RULES)

    assert spec(("batch", "seq", "embed"), (16, 128, 64)) == P(("data", "fsdp"), None, None)
    assert spec(("batch", "seq", "mlp"), (16, 128, 96)) == P(("data", "fsdp"), None, "tensor")
    # A batch of 2 splits over data only; 3 heads do not split over tensor=2: both stay whole, not errors.
    assert spec(("batch", "seq", "heads", "head_dim"), (2, 8, 3, 16)) == P("data", None, None, None)


def test_constrain_is_a_no_op_outside_a_sharded_step():
    x = jnp.ones((4, 8, 16))
    assert sharding.constrain(x, ("batch", "seq", "embed")) is x
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1))
    with sharding.activation_mesh(mesh):  # one device: nothing to split, nothing added to the program
        assert sharding.constrain(x, ("batch", "seq", "embed")) is x


def test_batch_must_split_over_data_and_fsdp():
    mesh = sharding.abstract_mesh(MeshConfig(2, 4, 1), 8)
    sharding.check_batch(mesh, 16, 2)
    with pytest.raises(UserError, match="multiple of 32"):
        sharding.check_batch(mesh, 16, 4)


def test_one_process_reads_the_whole_batch():
    assert sharding.data_shard(sharding.make_mesh(MeshConfig(1, -1, 1)), 16) == (0, 1)


# ---------------------------------------------------------------------------------------------
# Process start-up


def test_distributed_settings_come_from_config_then_environment():
    env = {"ANYCHIP_COORDINATOR": "10.0.0.1:1234", "ANYCHIP_NUM_PROCESSES": "4", "ANYCHIP_PROCESS_ID": "3"}
    assert distributed.distributed_args(DistributedConfig(), env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    cfg = load_config(None, ["distributed.coordinator_address=host:9", "distributed.num_processes=2",
                             "distributed.process_id=1"]).distributed
    assert distributed.distributed_args(cfg, env) == {"coordinator_address": "host:9", "num_processes": 2,
                                                   "process_id": 1}
    with pytest.raises(UserError, match="ANYCHIP_PROCESS_ID"):
        distributed.distributed_args(DistributedConfig(), {"ANYCHIP_PROCESS_ID": "one"})
    with pytest.raises(UserError, match="process_id"):
        load_config(None, ["distributed.num_processes=2", "distributed.process_id=2"])


@pytest.mark.parametrize("env, n", [
    ({}, 1),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "0"}, 1),  # a batch script, not an srun step
    ({"SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "16"}, 16),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, 4),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, 4),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1", "MEGASCALE_NUM_SLICES": "2"}, 4),
])
def test_launcher_detection(env, n):
    assert distributed.launched_processes(env) == n


def test_single_process_runs_do_not_start_jax_distributed():
    # The backend is already up in this test process: a call to jax.distributed.initialize would raise.
    assert distributed.initialize_distributed(DistributedConfig(), environ={}) is False
    launched = {"ANYCHIP_COORDINATOR": "h:1", "OMPI_COMM_WORLD_SIZE": "2"}
    assert distributed.initialize_distributed(DistributedConfig(initialize="never"), environ=launched) is False


def test_compile_cache_can_be_disabled():
    assert distributed.enable_compile_cache(None) is None
    assert distributed.enable_compile_cache("none") is None
    assert load_config(None, ["compute.compile_cache_dir=null"]).compute.compile_cache_dir is None


# ---------------------------------------------------------------------------------------------
# Memory: the planner's estimate and auto_fit


def test_fsdp_divides_state_and_rows_per_device():
    cfg = load_config(None, ["model=1b", "train.batch_size=16", "train.seq_len=2048"])
    one = memory.estimate(cfg, {"data": 1, "fsdp": 1, "tensor": 1})
    eight = memory.estimate(cfg, {"data": 1, "fsdp": 8, "tensor": 1})
    assert eight["optimizer"] == pytest.approx(one["optimizer"] / 8, rel=0.01)  # norms stay replicated
    assert one["optimizer"] == pytest.approx(2 * one["params"])  # AdamW m, v
    assert eight["activations"] < one["activations"] / 7  # 8× fewer rows per device
    assert "params" in memory.format_estimate(one) and "GiB" in memory.format_estimate(one)


def test_auto_fit_skips_where_device_memory_is_unknown(monkeypatch):
    monkeypatch.setattr(memory, "device_memory", lambda: (None, "cpu reports no memory limit"))
    cfg = load_config(None, ["model=tiny", "train.auto_fit=true"])
    lines = []
    assert memory.auto_fit(cfg, 1, lines.append) is cfg
    assert "skipped" in lines[0]


def test_auto_fit_trades_remat_and_microbatches_for_memory(monkeypatch):
    cfg = load_config(None, ["model=1b", "train.batch_size=16", "train.seq_len=4096", "train.auto_fit=true"])
    picks = {}
    for gib in (80, 16):
        monkeypatch.setattr(memory, "device_memory", lambda gib=gib: (gib * 2**30, "test"))
        fitted = memory.auto_fit(cfg, 8, lambda _: None)
        assert memory.estimate(fitted, {"data": 1, "fsdp": 8, "tensor": 1})["total"] <= gib * 2**30
        picks[gib] = (fitted.compute.remat, fitted.train.grad_accum)
    order = ["none", "dots", "full"]  # less memory to the right; then more microbatches
    assert picks[80] != picks[16] and (order.index(picks[16][0]), picks[16][1]) > (order.index(picks[80][0]), picks[80][1])
    monkeypatch.setattr(memory, "device_memory", lambda: (2 * 2**30, "test"))
    with pytest.raises(UserError, match="nothing fits"):
        memory.auto_fit(cfg, 8, lambda _: None)

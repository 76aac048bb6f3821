"""The fused, chunked unembedding + cross-entropy against the reference path (full logits, then
`loss.cross_entropy`): values, gradients, z-loss, tied and untied embeddings, and the claim that the
whole batch's logits never exist."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anychip.config import MODEL_PRESETS, load_config, replace
from anychip.model.decoder import unembed, unembedding
from anychip.model.loss import chunked_cross_entropy, cross_entropy
from anychip.model.params import init_params
from anychip.parallel import mesh as sharding
from anychip.train import memory
from anychip.train.step import abstract_state, build_trainer, grads_and_loss

TINY = MODEL_PRESETS["tiny"]
B, T = 4, 32


def inputs(cfg, dtype, key=0):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    params = init_params(cfg, k1)
    # Spread-out hidden states give logits of O(1..10), so the softmax is far from uniform and a wrong
    # gradient (a missing lse factor, a sign) is far from the reference.
    h = (3 * jax.random.normal(k2, (B, T, cfg.d_model))).astype(dtype)
    targets = jax.random.randint(k3, (B, T), 0, cfg.vocab_size)
    return params, h, targets


def reference(params, h, targets, cfg, z_loss):
    return cross_entropy(unembed(params, h, cfg), targets, z_loss)


def fused(params, h, targets, cfg, z_loss, chunk=8):
    return chunked_cross_entropy(h, unembedding(params, cfg), targets, chunk=chunk, z_loss=z_loss)


def loss_and_grads(fn, params, h, targets, cfg, z_loss):
    (loss, ce), (g_params, g_h) = jax.value_and_grad(
        lambda p, x: fn(p, x, targets, cfg, z_loss), argnums=(0, 1), has_aux=True)(params, h)
    g_w = g_params["embed"] if cfg.tie_embeddings else g_params["lm_head"]
    return loss, ce, g_w, g_h


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_fp32_matches_the_reference(tied, z_loss):
    # fp32 throughout at "highest" matmul precision: the two paths differ only in summation order
    # (chunks of 8 positions, then a running sum), so losses agree to a few fp32 ulps (~1e-6 relative)
    # and gradients to ~1e-6 of their largest entry. A wrong term (z-loss, 1/N, the one-hot) errs by >1e-2.
    cfg = dataclasses.replace(TINY, tie_embeddings=tied)
    params, h, targets = inputs(cfg, jnp.float32)
    with jax.default_matmul_precision("highest"):
        ref = loss_and_grads(reference, params, h, targets, cfg, z_loss)
        got = loss_and_grads(fused, params, h, targets, cfg, z_loss)
    assert float(ref[1]) > 1.0  # a real loss: far from a trivially predicted target
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-6)
    assert rel_err(got[2], ref[2]) < 1e-5
    assert rel_err(got[3], ref[3]) < 1e-5


def test_evaluation_without_gradients_matches_the_reference():
    # Outside differentiation (eval) the primal path runs: sums only, no dlogits, no dW.
    params, h, targets = inputs(TINY, jnp.float32)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda p, x: fused(p, x, targets, TINY, 1e-2))(params, h)
        ref = reference(params, h, targets, TINY, 1e-2)
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_bf16_compute_matches_the_reference():
    # bf16 hidden states and matmul inputs, fp32 accumulation in both paths. The fused path rounds
    # dlogits to bf16 before its two matmuls (8 significant bits, 2^-9 ≈ 2e-3 relative per entry); the
    # reference rounds at other points. Entries are sums over hundreds of terms whose rounding errors
    # partly cancel: 2e-2 of the largest entry allows for that and still rejects a wrong formula (>1e-1).
    params, h, targets = inputs(TINY, jnp.bfloat16)
    ref = loss_and_grads(reference, params, h, targets, TINY, 1e-3)
    got = loss_and_grads(fused, params, h, targets, TINY, 1e-3)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-3)  # both reduce fp32 logits of the same bf16 inputs
    assert got[3].dtype == jnp.bfloat16 and got[2].dtype == jnp.float32  # cotangents keep their primals' dtypes
    assert rel_err(got[2], ref[2]) < 2e-2
    assert rel_err(got[3], ref[3]) < 2e-2


def test_cross_entropy_output_is_a_metric_without_gradient():
    params, h, targets = inputs(TINY, jnp.float32)
    g = jax.grad(lambda x: fused(params, x, targets, TINY, 0.0)[1])(h)
    assert not np.any(np.asarray(g))


def test_the_whole_batch_logits_never_exist():
    # The claim of the module: no intermediate of the differentiated loss holds B·T·V logit-like values
    # (the reference has several), only chunks of B·chunk·V. Parameters (V, D) are 2-D and left out.
    params, h, targets = inputs(TINY, jnp.bfloat16)
    full = B * T * TINY.vocab_size

    def largest(fn):
        jaxpr = jax.make_jaxpr(jax.grad(lambda p, x: fn(p, x, targets, TINY, 0.0)[0], argnums=(0, 1)))(params, h)
        sizes = [int(np.prod(v.aval.shape)) for eqn in iter_eqns(jaxpr.jaxpr) for v in eqn.outvars
                 if v.aval.ndim >= 3 and v.aval.shape[-1] == TINY.vocab_size]
        return max(sizes)

    assert largest(reference) >= full
    assert largest(fused) <= full // (T // 8)


def iter_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():  # scan, custom_vjp, pjit... bodies
            for item in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    yield from iter_eqns(inner)


@pytest.mark.slow  # long: the slow job (.ci/long)
def test_training_gradients_with_loss_chunk_match_the_reference_path():
    # The whole train-step gradient (every parameter, grad accumulation over 2 microbatches, z-loss)
    # through step.grads_and_loss; tolerances as in the fp32 test above.
    cfg = load_config(None, ["model=tiny", "compute.dtype=float32", "train.batch_size=4",
                             "train.seq_len=32", "train.z_loss=1e-3", "train.grad_accum=2"])
    params = init_params(cfg.model, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 33), 0, cfg.model.vocab_size)
    with jax.default_matmul_precision("highest"):
        ref_g, ref_ce = grads_and_loss(params, tokens, cfg)
        got_g, got_ce = grads_and_loss(params, tokens, replace(cfg, compute={"loss_chunk": 16}))
    np.testing.assert_allclose(got_ce, ref_ce, rtol=1e-6)
    for path, g in jax.tree_util.tree_leaves_with_path(got_g):
        assert rel_err(g, _at(ref_g, path)) < 1e-5, jax.tree_util.keystr(path)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_chunk_must_divide_the_sequence():
    params, h, targets = inputs(TINY, jnp.float32)
    with pytest.raises(ValueError, match="does not divide"):
        fused(params, h, targets, TINY, 0.0, chunk=5)


def test_train_step_memory_drops_with_loss_chunk_in_xla_and_in_the_planner():
    # A vocabulary-heavy shape (V = 16384, d = 128), where the logits dominate the step's temporaries:
    # XLA's own memory analysis of the compiled train step must show the saving, and the planner (which
    # train.auto_fit and `anychip plan` use) must predict one. Measured on XLA:CPU: temp 380 MB → 147 MB.
    def step_memory(chunk):
        cfg = load_config(None, ["model=tiny", "model.vocab_size=16384", "model.d_model=128", "model.d_ff=352",
                                 "compute.dtype=float32", "train.batch_size=8", "train.seq_len=256",
                                 f"compute.loss_chunk={chunk}"])
        trainer = build_trainer(cfg)
        batch = jax.ShapeDtypeStruct((8, 257), jnp.int32, sharding=sharding.batch_sharding(trainer.mesh))
        temp = trainer.step.lower(abstract_state(trainer), batch).compile().memory_analysis().temp_size_in_bytes
        return temp, memory.estimate(cfg, dict(trainer.mesh.shape))["activations"]

    (xla_full, est_full), (xla_chunked, est_chunked) = step_memory(0), step_memory(32)
    assert xla_chunked < 0.5 * xla_full
    assert est_chunked < 0.5 * est_full

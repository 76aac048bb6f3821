"""Properties of the decoder that must hold whatever the weights: causality, GQA, RoPE, gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo_dots import dot_operand_types, needs_cpu_bf16_dots

from anychip.config import MODEL_PRESETS, ModelConfig
from anychip.model.attention import xla_attention
from anychip.model.decoder import (
    _REMAT_POLICIES,
    _rotate,
    apply_rope,
    decoder_block,
    dense,
    forward,
    rope_tables,
)
from anychip.model.loss import cross_entropy
from anychip.model.params import count_params, init_params, param_shapes

TINY = MODEL_PRESETS["tiny"]
FP32 = {"compute_dtype": jnp.float32}


def test_param_count_matches_the_llama_formula():
    cfg = MODEL_PRESETS["1b"]
    D, F, V, L, kv = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers, cfg.n_kv_heads * cfg.head_dim
    per_layer = 2 * D * D + 2 * D * kv + 3 * D * F + 2 * D
    assert count_params(cfg) == 2 * V * D + L * per_layer + D


def test_afm_preset_is_the_published_shape():
    # AFM on-device (arXiv 2407.21075, Table 1): 2.58B non-embedding + 0.15B embedding parameters.
    cfg = MODEL_PRESETS["afm-3b"]
    embedding = cfg.vocab_size * cfg.d_model
    assert abs(embedding - 0.15e9) < 0.005e9
    assert abs((count_params(cfg) - embedding) - 2.58e9) < 0.02e9


def test_causality(key):
    params = init_params(TINY, key)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, TINY.vocab_size)
    base = forward(params, tokens, TINY, **FP32)
    t = 9
    changed = tokens.at[:, t].set((tokens[:, t] + 7) % TINY.vocab_size)
    after = forward(params, changed, TINY, **FP32)
    np.testing.assert_array_equal(np.asarray(base[:, :t]), np.asarray(after[:, :t]))
    assert not np.allclose(base[:, t:], after[:, t:])  # and the change is visible from t on


def test_gqa_with_all_kv_heads_is_multi_head_attention(key):
    B, T, H, hd = 2, 8, 4, 16
    q, k, v = (jax.random.normal(k_, (B, T, H, hd)) for k_ in jax.random.split(key, 3))
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
    scores = jnp.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    expected = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, -1), v)
    np.testing.assert_allclose(xla_attention(q, k, v), expected, rtol=1e-5, atol=1e-5)


def test_gqa_shares_each_kv_head_across_its_query_group(key):
    B, T, H, KV, hd = 1, 6, 4, 2, 8
    q = jax.random.normal(key, (B, T, H, hd))
    k, v = (jax.random.normal(k_, (B, T, KV, hd)) for k_ in jax.random.split(jax.random.key(3), 2))
    repeated = xla_attention(q, jnp.repeat(k, H // KV, axis=2), jnp.repeat(v, H // KV, axis=2))
    np.testing.assert_allclose(xla_attention(q, k, v), repeated, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position(key):
    hd = 16
    q, k = jax.random.normal(key, (2, hd))

    def score(pos_q, pos_k):
        cos, sin = rope_tables(jnp.array([[pos_q, pos_k]]), hd, 10000.0)  # (1, 2, hd)
        x = jnp.stack([q, k])[None, :, None, :]  # (1, 2, 1, hd)
        rq, rk = apply_rope(x, cos, sin)[0, :, 0]
        return float(rq @ rk)

    assert score(3, 1) == pytest.approx(score(12, 10), rel=1e-5)
    assert score(7, 7) == pytest.approx(score(0, 0), rel=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_backward_is_the_transpose_of_the_rotation(key, dtype):
    """apply_rope's hand-written backward (the rotation by -angle) against autodiff of the same rotation in
    fp32. fp32: the same two products per element, summed in another order (atol 1e-6 on values of size
    ~3). bf16: one rounding of the fp32 result, so within half a bf16 ulp (rtol 2^-8)."""
    x, dy = jax.random.normal(key, (2, 2, 5, 3, 16)).astype(dtype)
    positions = np.array([[0, 1, 2, 3, 4], [7, 300, 9, 11, 4000]])  # per row, as in decoding
    cos, sin = rope_tables(positions, 16, 10000.0)
    got = jax.vjp(apply_rope, x, cos, sin)[1](dy)[0]
    want = jax.vjp(lambda x: _rotate(x, cos, sin), x.astype(jnp.float32))[1](dy.astype(jnp.float32))[0]
    assert got.dtype == dtype
    rtol, atol = (0, 1e-6) if dtype == jnp.float32 else (2**-8, 0)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=rtol, atol=atol)


@pytest.mark.slow  # long: the slow job (.ci/long)
def test_gradients_match_finite_differences():
    cfg = dataclasses.replace(TINY, n_layers=1, vocab_size=32, d_model=16, n_heads=2, n_kv_heads=1, d_ff=24,
                              qk_norm=True, tie_embeddings=False)
    params = jax.tree.map(lambda p: p * 5, init_params(cfg, jax.random.key(0)))  # a non-trivial loss surface
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)

    def loss(p):
        return cross_entropy(forward(p, tokens[:, :-1], cfg, **FP32), tokens[:, 1:], z_loss=1e-2)[0]

    grads = jax.grad(loss)(params)
    rng = np.random.default_rng(0)
    eps = 1e-2
    for group, name in (("layers", "wq"), ("layers", "w_down"), ("layers", "q_norm"), (None, "embed"),
                        (None, "lm_head")):
        def at(tree, group=group, name=name):
            return tree[group][name] if group else tree[name]

        direction = rng.standard_normal(at(params).shape).astype(np.float32)
        direction /= np.linalg.norm(direction)

        def shifted(sign, group=group, name=name, direction=direction):
            new = at(params) + sign * eps * direction
            return {**params, group: {**params[group], name: new}} if group else {**params, name: new}

        numeric = (float(loss(shifted(+1))) - float(loss(shifted(-1)))) / (2 * eps)
        analytic = float(jnp.sum(at(grads) * direction))
        # Central differences: truncation error ~ eps^2 * (third derivative) ~ 1e-4, fp32 round-off
        # ~ 1e-7 * loss / eps ~ 1e-5; 1% relative (1e-3 absolute near zero) separates right from wrong.
        assert numeric == pytest.approx(analytic, rel=1e-2, abs=1e-3), name


def test_bf16_compute_tracks_fp32(key):
    params = init_params(TINY, key)
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, TINY.vocab_size)
    ref = forward(params, tokens, TINY, **FP32)
    low = forward(params, tokens, TINY, compute_dtype=jnp.bfloat16)
    assert low.dtype == jnp.float32  # logits are always fp32
    # bf16 has 8 mantissa bits (rel. error ~4e-3 per op); a 2-layer net stays within a few 1e-2.
    np.testing.assert_allclose(low, ref, atol=5e-2)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_do_not_change_gradients(key, remat):
    params = init_params(TINY, key)
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, TINY.vocab_size)

    def loss(p, remat):
        return cross_entropy(forward(p, tokens[:, :-1], TINY, remat=remat, **FP32), tokens[:, 1:])[0]

    ref = jax.grad(loss)(params, "none")
    got = jax.grad(loss)(params, remat)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("spec, n_in", [("btd,df->btf", 1), ("bthk,hkd->btd", 2)])
def test_dense_computes_the_einsum_and_its_gradients(key, spec, n_in):
    x_shape, w_shape = {1: ((2, 16, 24), (24, 40)), 2: ((2, 16, 3, 8), (3, 8, 24))}[n_in]
    x, w = (jax.random.normal(k, s) for k, s in zip(jax.random.split(key), (x_shape, w_shape)))
    dy = jax.random.normal(jax.random.key(7), jnp.einsum(spec, x, w).shape)

    def pullback(fn, dtype):
        out, vjp = jax.vjp(lambda a, b: fn(a.astype(dtype), b).astype(jnp.float32), x, w)
        return (out, *vjp(dy))

    ref = pullback(lambda a, b: jnp.einsum(spec, a, b, precision="highest"), jnp.float32)
    for got, want in zip(pullback(lambda a, b: dense(a, b, n_in), jnp.float32), ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # fp32: summation order only
    # bf16 operands (8 mantissa bits: ~4e-3 relative each) summed over 24-32 terms of unit size, fp32
    # accumulation: errors ~4e-3 * sqrt(32) ~ 0.02 per output; 0.1 separates right from a wrong contraction.
    for got, want in zip(pullback(lambda a, b: dense(a, b, n_in), jnp.bfloat16), ref):
        np.testing.assert_allclose(got, want, atol=0.1)


@needs_cpu_bf16_dots
def test_dense_runs_every_dot_on_bf16_operands_on_the_cpu():
    """The point of `dense`: XLA:CPU upcasts a bf16 dot with a bf16 result to fp32, which an einsum's
    forward and backward both are; dense's forward and backward dots keep bf16 operands."""
    x, w = jnp.ones((8, 64, 32), jnp.bfloat16), jnp.ones((32, 48), jnp.float32)

    def operand_types(fn):
        grad = jax.jit(jax.grad(lambda a, b: jnp.sum(fn(a, b).astype(jnp.float32) ** 2), (0, 1)))
        return dot_operand_types(grad.lower(x, w).compile().as_text())

    assert set(operand_types(lambda a, b: jnp.einsum("btd,df->btf", a, b.astype(a.dtype)))) == {"f32"}  # the problem
    assert set(operand_types(dense)) == {"bf16"} and len(operand_types(dense)) == 6  # 3 dots, 2 operands each


def test_rope_tables_for_known_positions_equal_the_traced_ones():
    """The host table (numpy) and the in-program one (XLA) may round an fp32 angle (position × inverse
    frequency, at most 1) one ulp apart, a cos/sin difference of up to that ulp, which the position's own
    ulp bounds (4.9e-4 at positions 2,048–4,095); beyond it they must agree to 1e-6."""
    positions = np.arange(4096)[None]
    host = rope_tables(positions, 64, 500000.0)
    traced = jax.jit(lambda p: rope_tables(p, 64, 500000.0))(jnp.asarray(positions))
    position_ulp = np.spacing(positions[..., None].astype(np.float32))  # (1, T, 1)
    for a, b in zip(host, traced, strict=True):
        assert np.all(np.abs(np.asarray(a) - np.asarray(b)) <= position_ulp + 1e-6)


def test_training_gradient_computes_no_cos_or_sin(key):
    """Positions 0..T-1 make the rotary table a constant of the compiled program: XLA otherwise fuses its
    cos and sin into every consumer and recomputes them for each batch row and head."""
    params = init_params(TINY, key)
    tokens = jnp.zeros((2, 256), jnp.int32)
    loss = lambda p: forward(p, tokens, TINY, compute_dtype=jnp.float32).sum()
    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert " cosine(" not in hlo and " sine(" not in hlo


@pytest.mark.parametrize("remat, saved", [("dots", 6), ("dots_no_batch", 6), ("full", 0)])
def test_remat_policies_see_the_projections_inside_dense(key, remat, saved, capsys):
    """dense's dots sit inside a custom_vjp, out of a policy's sight; its named output is what the dot
    policies keep instead, as they kept the einsums' outputs: q, k, v, o, gate and up of a layer (the down
    projection only feeds the residual sum, whose gradient needs no values)."""
    params = init_params(TINY, key)
    layer = jax.tree.map(lambda a: a[0], params["layers"])
    cos, sin = rope_tables(jnp.arange(16)[None], TINY.head_dim, TINY.rope_base)
    block = jax.checkpoint(lambda x: decoder_block(x, layer, TINY, cos, sin, lambda q, k, v: (xla_attention(q, k, v), None))[0],
                           policy=_REMAT_POLICIES[remat])
    jax.ad_checkpoint.print_saved_residuals(block, jnp.ones((2, 16, TINY.d_model)))
    assert capsys.readouterr().out.count("named 'dense_out'") == saved


def test_qk_norm_and_untied_head_change_the_parameter_tree():
    cfg = ModelConfig(qk_norm=True, tie_embeddings=False)
    shapes = param_shapes(cfg)
    assert shapes["layers"]["q_norm"] == (cfg.n_layers, cfg.head_dim)
    assert shapes["lm_head"] == (cfg.d_model, cfg.vocab_size)
    assert "lm_head" not in param_shapes(ModelConfig())


def test_portable_attention_matches_jax_reference(key):
    # jax.nn.dot_product_attention(implementation="xla") is JAX's own GQA reference; the cuDNN kernel
    # behind the same function is checked against it on GPU (benchmarks/RESULTS.md), not here.
    B, T, H, KV, hd = 2, 33, 8, 2, 16
    q = jax.random.normal(key, (B, T, H, hd))
    k, v = (jax.random.normal(k_, (B, T, KV, hd)) for k_ in jax.random.split(jax.random.key(7), 2))
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(xla_attention(q, k, v), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_attention_matches_portable_path(key):
    from anychip.model.attention import cudnn_attention

    B, T, H, KV, hd = 2, 256, 8, 2, 64
    q = jax.random.normal(key, (B, T, H, hd), jnp.bfloat16)
    k, v = (jax.random.normal(k_, (B, T, KV, hd), jnp.bfloat16) for k_ in jax.random.split(jax.random.key(7), 2))
    # bf16 inputs: both paths accumulate in fp32 but round probabilities differently; 2e-2 is ~3 bf16 ulps at 1.
    np.testing.assert_allclose(np.asarray(cudnn_attention(q, k, v), np.float32),
                               np.asarray(xla_attention(q, k, v), np.float32), atol=2e-2)


def test_attention_auto_picks_each_chips_kernel():
    from anychip.model.attention import resolve

    assert resolve("auto", "cuda") == resolve("auto", "gpu") == "cudnn"
    assert resolve("auto", "tpu") == "splash"
    assert {resolve("auto", b) for b in ("rocm", "neuron", "cpu")} == {"blockwise"}
    assert resolve("auto") == resolve("auto", jax.default_backend())  # this machine, whatever it is
    assert resolve("cudnn", "cpu") == "cudnn"  # an explicit choice is kept


@pytest.mark.parametrize("platform_version, expected", [("rocm 60300", "blockwise"), ("cuda 13000", "cudnn")])
def test_attention_auto_tells_rocm_from_cuda(monkeypatch, platform_version, expected):
    # No GPU here: a stand-in device shaped like a PJRT GPU device, as JAX reports both kinds ("gpu").
    import types

    device = types.SimpleNamespace(client=types.SimpleNamespace(platform_version=platform_version))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    from anychip.model.attention import resolve

    assert resolve("auto") == expected


@pytest.mark.slow  # long: the slow job (.ci/long)
def test_unrolled_layers_compute_what_the_scan_computes(key):
    # The same ops in the same order per layer; XLA may fuse the unrolled program differently, so fp32
    # round-off (~1e-7 relative per op) is all that may differ.
    params = init_params(TINY, key)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, TINY.vocab_size)

    def loss(p, unroll):
        return cross_entropy(forward(p, tokens[:, :-1], TINY, unroll=unroll, **FP32), tokens[:, 1:])[0]

    (l_scan, g_scan), (l_unroll, g_unroll) = (jax.value_and_grad(loss)(params, u) for u in (False, True))
    np.testing.assert_allclose(l_unroll, l_scan, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_unroll), jax.tree.leaves(g_scan)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

"""The attention kernels against the einsum reference: blockwise (portable flash), splash (Pallas TPU, in
interpret mode on CPU), document masking, and what the compiled blockwise program keeps in memory."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo_dots import dot_operand_types, needs_cpu_bf16_dots

from anychip.check.portability import _while_conditions, check_function, has_static_trip_count, module_text
from anychip.config import MODEL_PRESETS
from anychip.model.attention import causal_mask, document_segments, xla_attention
from anychip.model.blockwise import block_pairs, blockwise_attention
from anychip.model.decoder import forward
from anychip.model.params import init_params

# fp32: the blockwise kernel sums the same products in another order (per tile, rescaled by the running
# max), so only rounding differs: observed ≤ 3e-6 on values and gradients of magnitude ~1-10.
FP32_TOL = 1e-5


def qkv(T, H, KV, hd=8, B=2, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, hd), dtype)
    k = jax.random.normal(ks[1], (B, T, KV, hd), dtype)
    v = jax.random.normal(ks[2], (B, T, KV, hd), dtype)
    return q, k, v, jax.random.normal(ks[3], (B, T, H, hd), jnp.float32)  # w: a cotangent to pull back


def value_and_grads(fn, q, k, v, w):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    return fn(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)


def segments_of(T, B=2, seed=1):
    """Document ids of random tokens where id 0 (end of text) is common: several documents per row."""
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, 6)
    return document_segments(tokens, 0)


# T not a multiple of the block (37, 50, 33), one block (50 with block 64), GQA ratios 1, 2, 4 and MQA.
@pytest.mark.parametrize("T, block, H, KV, documents", [
    (37, 16, 4, 2, True),  # the default suite's case: T not a multiple of the block, GQA 2, documents
    pytest.param(33, 8, 8, 1, True, marks=pytest.mark.slow), pytest.param(37, 16, 4, 2, False, marks=pytest.mark.slow),
    pytest.param(64, 16, 6, 6, True, marks=pytest.mark.slow), pytest.param(50, 64, 4, 1, False, marks=pytest.mark.slow),
])
def test_blockwise_matches_reference_fp32(T, block, H, KV, documents):
    q, k, v, w = qkv(T, H, KV)
    seg = segments_of(T) if documents else None
    out, grads = value_and_grads(lambda q, k, v: blockwise_attention(q, k, v, seg, block=block), q, k, v, w)
    mask = causal_mask(T, seg)
    ref, ref_grads = value_and_grads(lambda q, k, v: xla_attention(q, k, v, mask), q, k, v, w)
    np.testing.assert_allclose(out, ref, rtol=FP32_TOL, atol=FP32_TOL)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=FP32_TOL, atol=FP32_TOL)


def test_blockwise_bf16_is_as_close_to_fp32_as_the_reference_is():
    # bf16 keeps 8 mantissa bits (relative error 2^-9 per rounding); both paths round q, k, v, the
    # probabilities and dS to bf16 and accumulate in fp32. The blockwise error against the fp32 truth must
    # stay within 2x the bf16 reference's own error (plus 1e-3 for elements where that one is tiny).
    q, k, v, w = qkv(96, 4, 2, hd=16)
    truth, truth_grads = value_and_grads(xla_attention, q, k, v, w)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out, grads = value_and_grads(lambda q, k, v: blockwise_attention(q, k, v, block=32), *bf, w)
    ref, ref_grads = value_and_grads(xla_attention, *bf, w)
    assert out.dtype == jnp.bfloat16
    for a, r, t in zip((out, *grads), (ref, *ref_grads), (truth, *truth_grads)):
        err, ref_err = (np.abs(np.asarray(x, np.float32) - np.asarray(t)).max() for x in (a, r))
        assert err <= 2 * ref_err + 1e-3, (err, ref_err)


def test_blockwise_visits_only_the_causal_tiles_in_one_static_loop():
    # 4 blocks: 10 of the 16 tiles are on or below the diagonal, the diagonal first. The lowered program
    # loops over exactly those (a constant trip count) forward and backward, with no lax.cond, so it passes
    # the Neuron rules.
    assert [list(x) for x in block_pairs(4)] == [[0, 1, 2, 3, 1, 2, 2, 3, 3, 3], [0, 1, 2, 3, 0, 0, 1, 0, 1, 2]]
    q, k, v, w = qkv(64, 4, 2)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, block=16) * w), (0, 1, 2)))
    report = check_function(grad, (q, k, v), "neuron")
    assert report.ok, report.findings
    text = module_text(jax.export.export(grad, platforms=["neuron"])(q, k, v))
    conds = _while_conditions(text)
    assert len(conds) == 2 and all(has_static_trip_count(c) for c in conds)  # forward and backward scans
    for cond in conds:  # counter < a constant defined outside the condition region: it must be 10
        bound = re.search(r"compare\s+LT, %iterArg\w*, (%[\w#]+)", cond[0]).group(1)
        assert f"{bound} = stablehlo.constant dense<10> : tensor<i32>" in text


def test_blockwise_keeps_no_score_matrix():
    # Assert memory from the compiled program: at T=4096 the reference's fp32 scores alone are
    # B·H·T²·4 = 256 MiB; the blockwise gradient's temporaries (a few 256×256 tiles per head, the fp32
    # gradient accumulators) must stay under a sixteenth of that.
    B, T, H, KV, hd = 1, 4096, 4, 2, 16
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((B, T, H, hd), (B, T, KV, hd), (B, T, KV, hd))]

    def temp_bytes(fn):
        compiled = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), (0, 1, 2))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = B * H * T * T * 4
    assert temp_bytes(xla_attention) >= scores
    assert temp_bytes(lambda q, k, v: blockwise_attention(q, k, v, block=256)) < scores / 16



@needs_cpu_bf16_dots
def test_blockwise_gradient_runs_every_dot_on_bf16_operands_on_the_cpu():
    """dK and dV contract the probabilities and the queries over their rows; written so (dSᵀ·Q), XLA:CPU
    runs those two dots upcast to fp32 outside YNNPACK, 5-9x slower. The kernel accumulates them transposed
    (Qᵀ·dS), so every dot of the forward and backward keeps bf16 operands."""
    q, k, v, w = qkv(T=64, H=4, KV=2, hd=16, dtype=jnp.bfloat16)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, block=16).astype(jnp.float32) * w),
                            (0, 1, 2)))
    types = dot_operand_types(grad.lower(q, k, v).compile().as_text())
    assert len(types) == 2 * 7 and set(types) == {"bf16"}  # 2 forward + 5 backward dots, 2 operands each

CFG = dataclasses.replace(MODEL_PRESETS["tiny"], vocab_size=64, n_layers=1, init_std=0.3)
EOT = 0


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_documents_do_not_see_each_other(impl):
    # Tokens 0..9 are one document ending in EOT at 9, then another one. Changing the second document
    # changes no logit of the first (causality alone gives that), and changing the first one changes no
    # logit of the second (only the document mask gives that); without the mask the second one does change.
    params = init_params(CFG, jax.random.key(0))
    base = np.array(jax.random.randint(jax.random.key(1), (1, 24), 1, CFG.vocab_size))
    base[0, 9] = EOT
    later, earlier = base.copy(), base.copy()
    later[0, 15] = (later[0, 15] % (CFG.vocab_size - 1)) + 1  # another non-EOT token after the EOT
    earlier[0, 3] = (earlier[0, 3] % (CFG.vocab_size - 1)) + 1  # ... and before it

    runs = {eot: jax.jit(lambda p, t, eot=eot: forward(p, t, CFG, compute_dtype=jnp.float32, attention_impl=impl,
                                                       attention_block=8, eot_id=eot)) for eot in (EOT, None)}

    def logits(tokens, eot_id=EOT):
        return np.asarray(runs[eot_id](params, jnp.asarray(tokens)))[0]

    ref = logits(base)
    np.testing.assert_array_equal(logits(later)[:10], ref[:10])
    assert np.abs(logits(later)[15:] - ref[15:]).max() > 1e-3
    np.testing.assert_allclose(logits(earlier)[10:], ref[10:], atol=1e-6)  # fp32 rounding only
    assert np.abs(logits(earlier)[3:10] - ref[3:10]).max() > 1e-3
    assert np.abs(logits(earlier, None)[10:] - logits(base, None)[10:]).max() > 1e-3  # no mask: it leaks


def test_splash_matches_reference_in_interpret_mode():
    # The Pallas TPU kernel itself, run by Pallas' interpreter on CPU: GQA, T=200 padded to two blocks of
    # 128 (the TPU lane width, so head_dim 128 too), documents. fp32; the kernel's own reduction order.
    from anychip.model.splash import splash_attention

    q, k, v, _ = qkv(200, 4, 2, hd=128, B=1)
    seg = segments_of(200, B=1)
    out = splash_attention(q, k, v, seg, block=128, interpret=True)
    np.testing.assert_allclose(out, xla_attention(q, k, v, causal_mask(200, seg)), rtol=FP32_TOL, atol=FP32_TOL)


@pytest.mark.slow
def test_splash_gradients_match_reference_in_interpret_mode():
    from anychip.model.splash import splash_attention

    q, k, v, w = qkv(200, 4, 2, hd=128, B=1)
    seg = segments_of(200, B=1)
    _, grads = value_and_grads(lambda q, k, v: splash_attention(q, k, v, seg, block=128, interpret=True), q, k, v, w)
    mask = causal_mask(200, seg)
    _, ref = value_and_grads(lambda q, k, v: xla_attention(q, k, v, mask), q, k, v, w)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, rtol=FP32_TOL, atol=2e-5)


@pytest.mark.slow  # tests/test_portability.py lowers the default TPU step (splash) in the default suite
def test_fast_kernels_lower_for_their_chips_with_documents():
    # No GPU or TPU here: lowering is enough to show the document mask reaches each vendor kernel (a cuDNN
    # custom call for CUDA, a Mosaic kernel for TPU), and that each is reported as native there only.
    from anychip.model.attention import cudnn_attention
    from anychip.model.splash import splash_attention

    q, k, v, _ = qkv(256, 4, 2, hd=128, B=1, dtype=jnp.bfloat16)
    seg = segments_of(256, B=1)
    for platform, fn, vendor in (("cuda", cudnn_attention, "cuDNN"), ("tpu", splash_attention, "Mosaic TPU")):
        report = check_function(jax.jit(fn), (q, k, v, seg), platform)
        assert report.ok and any(vendor in f.message and not f.fatal for f in report.findings), report.findings

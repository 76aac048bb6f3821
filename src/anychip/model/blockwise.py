"""Portable flash attention in pure JAX: key blocks with an online softmax, a recomputing backward.

The sequence is padded to a multiple of the block and cut into query and key blocks. Causal attention
only needs the block pairs (i, j) with key block j starting at or before query block i ends: that list
is built in Python (static), and one `lax.scan` runs over it, forward and backward alike, so the trip
count is a constant and no `lax.cond` or data-dependent loop appears (the Neuron limits,
check/portability.py). Per pair the scores are one (block × block) tile per head; the forward keeps only
running max / sum / output per query, and `jax.custom_vjp` saves the output and the fp32 log-sum-exp,
from which the backward recomputes each tile's probabilities (FlashAttention-2, Dao 2023).

Grouped-query attention keeps K and V at their KV heads: queries are grouped (KV, G) and the einsums
broadcast K, V over G, so neither is repeated in memory. Document masking passes per-token segment ids:
a query sees a key only if both have the same id (and the key is not later).
"""

from __future__ import annotations

from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

# Residual names the decoder's remat policies save (model/decoder.py): with them, `remat=dots` keeps
# the attention output and log-sum-exp instead of running the forward scan again in the backward.
SAVED_NAMES = ("blockwise_out", "blockwise_lse")
_MASKED = -1e30  # finite: a fully masked tile must not turn the running max into inf - inf = NaN


@lru_cache(maxsize=64)
def block_pairs(n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """(query block, key block) indices of the causal lower triangle, row by row: the tiles to visit."""
    qi, kj = np.tril_indices(n_blocks)
    return qi.astype(np.int32), kj.astype(np.int32)


def _tile_mask(i, j, block: int, sb):
    """Which (query, key) of tile (i, j) may attend: (B or 1, 1, 1, bq, bk) bool. sb: (n, B, block) | None."""
    pos_q = i * block + jnp.arange(block)
    pos_k = j * block + jnp.arange(block)
    mask = (pos_q[:, None] >= pos_k[None, :])[None, None, None]  # (1, 1, 1, bq, bk)
    if sb is not None:
        seg_q, seg_k = _get(sb, i), _get(sb, j)  # (B, block)
        mask = mask & (seg_q[:, :, None] == seg_k[:, None, :])[:, None, None]
    return mask


def _get(x: jax.Array, i) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


def _set(x: jax.Array, i, value: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(x, value, i, 0)


def _add(x: jax.Array, i, value: jax.Array) -> jax.Array:
    return _set(x, i, _get(x, i) + value)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """(B, T, ...) → (T/block, B, block, ...): the block axis first, for dynamic indexing in the scan."""
    B, T = x.shape[:2]
    return jnp.moveaxis(x.reshape(B, T // block, block, *x.shape[2:]), 1, 0)


def _scores(q_i, k_j, scale: float, mask):
    """q_i (B, bq, KV, G, hd), k_j (B, bk, KV, hd) → fp32 scaled, masked scores (B, KV, G, bq, bk)."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask, s, _MASKED)


def _forward(q, k, v, seg, block: int):
    """Padded, grouped q (B, T, KV, G, hd), k, v (B, T, KV, hd), seg (B, T) | None →
    out (B, T, KV, G, hd) in q's dtype, lse (B, KV, G, T) fp32."""
    B, T, KV, G, hd = q.shape
    n, scale = T // block, 1.0 / np.sqrt(hd)
    qb, kb, vb = _blocks(q, block), _blocks(k, block), _blocks(v, block)
    sb = None if seg is None else _blocks(seg, block)  # (n, B, block)
    acc = jnp.zeros((n, B, KV, G, block, hd), jnp.float32)
    m = jnp.full((n, B, KV, G, block), -jnp.inf, jnp.float32)
    l = jnp.zeros((n, B, KV, G, block), jnp.float32)

    def step(carry, ij):
        acc, m, l = carry
        i, j = ij
        mask = _tile_mask(i, j, block, sb)
        s = _scores(_get(qb, i), _get(kb, j), scale, mask)  # (B, KV, G, bq, bk)
        m_i = _get(m, i)
        m_new = jnp.maximum(m_i, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m_i - m_new)  # rescales what was summed under the old max
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), _get(vb, j), preferred_element_type=jnp.float32)
        acc = _set(acc, i, _get(acc, i) * alpha[..., None] + pv)
        return (acc, _set(m, i, m_new), _set(l, i, _get(l, i) * alpha + p.sum(-1))), None

    (acc, m, l), _ = jax.lax.scan(step, (acc, m, l), block_pairs(n))
    out = acc / l[..., None]  # every query sees at least itself: l > 0
    out = jnp.moveaxis(out, 4, 2).swapaxes(0, 1).reshape(B, T, KV, G, hd)  # from (n, B, KV, G, bq, hd)
    lse = jnp.moveaxis(m + jnp.log(l), 0, 3).reshape(B, KV, G, T)  # (n, B, KV, G, bq) → (B, KV, G, T)
    return out.astype(q.dtype), lse


def _backward(q, k, v, seg, out, lse, d_out, block: int):
    """Gradients of q, k, v from the saved output and log-sum-exp, recomputing each tile's probabilities."""
    B, T, KV, G, hd = q.shape
    n, scale = T // block, 1.0 / np.sqrt(hd)
    qb, kb, vb, dob = _blocks(q, block), _blocks(k, block), _blocks(v, block), _blocks(d_out, block)
    sb = None if seg is None else _blocks(seg, block)
    lse_b = jnp.moveaxis(lse.reshape(B, KV, G, n, block), 3, 0)  # (n, B, KV, G, bq)
    # delta_q = Σ_d dO·O: the softmax backward's row term, once per query.
    delta = jnp.einsum("btkgd,btkgd->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta_b = jnp.moveaxis(delta.reshape(B, KV, G, n, block), 3, 0)  # (n, B, KV, G, bq)
    dq = jnp.zeros(qb.shape, jnp.float32)
    dk = jnp.zeros(kb.shape, jnp.float32)
    dv = jnp.zeros(vb.shape, jnp.float32)

    def step(carry, ij):
        dq, dk, dv = carry
        i, j = ij
        mask = _tile_mask(i, j, block, sb)
        q_i, k_j, do = _get(qb, i), _get(kb, j), _get(dob, i)
        p = jnp.where(mask, jnp.exp(_scores(q_i, k_j, scale, mask) - _get(lse_b, i)[..., None]), 0.0)
        dv = _add(dv, j, jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do.dtype), do, preferred_element_type=jnp.float32))
        dp = jnp.einsum("bqkgd,bskd->bkgqs", do, _get(vb, j), preferred_element_type=jnp.float32)
        ds = (p * (dp - _get(delta_b, i)[..., None]) * scale).astype(q.dtype)  # (B, KV, G, bq, bk)
        dq = _add(dq, i, jnp.einsum("bkgqs,bskd->bqkgd", ds, k_j, preferred_element_type=jnp.float32))
        dk = _add(dk, j, jnp.einsum("bkgqs,bqkgd->bskd", ds, q_i, preferred_element_type=jnp.float32))
        return (dq, dk, dv), None

    (dq, dk, dv), _ = jax.lax.scan(step, (dq, dk, dv), block_pairs(n))

    def unblock(x, like):  # (n, B, block, ...) → (B, T, ...)
        return jnp.moveaxis(x, 0, 1).reshape(like.shape).astype(like.dtype)

    return unblock(dq, q), unblock(dk, k), unblock(dv, v)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, block: int):
    return _forward(q, k, v, seg, block)[0]


def _flash_fwd(q, k, v, seg, block):
    out, lse = _forward(q, k, v, seg, block)
    out, lse = checkpoint_name(out, SAVED_NAMES[0]), checkpoint_name(lse, SAVED_NAMES[1])
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(block, res, d_out):
    q, k, v, seg, out, lse = res
    dq, dk, dv = _backward(q, k, v, seg, out, lse, d_out, block)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None = None,
    *, block: int = 512,
) -> jax.Array:
    """Causal attention: q (B, T, H, hd), k, v (B, T, KV, hd) with KV dividing H → (B, T, H, hd), in q's dtype.

    segments: (B, T) int document ids, or None for one document per row. Any T: the sequence is padded
    to a multiple of `block` (at most T itself); padded keys come after every real query, so the causal
    mask hides them.
    """
    B, T, H, hd = q.shape
    kv = k.shape[2]
    block = min(block, T)
    pad = -T % block

    def padded(x, value=0):
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)

    qg = padded(q).reshape(B, T + pad, kv, H // kv, hd)  # (B, T', KV, G, hd): query heads by their kv head
    seg = None if segments is None else padded(segments.astype(jnp.int32), -1)
    out = _flash(qg, padded(k), padded(v), seg, block)
    return out[:, :T].reshape(B, T, H, hd)

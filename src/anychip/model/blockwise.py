"""Portable flash attention in pure JAX: key blocks with an online softmax, a recomputing backward.

The sequence is padded to a multiple of the block and cut into query and key blocks. Causal attention
only needs the block pairs (i, j) with key block j starting at or before query block i ends: that list
is built in Python (static), and one `lax.scan` runs over it, forward and backward alike, so the trip
count is a constant and no `lax.cond` or data-dependent loop appears (the Neuron limits,
check/portability.py). Per pair the scores are one (block × block) tile per head; the forward keeps only
running max / sum / output per query, and `jax.custom_vjp` saves the output and the fp32 log-sum-exp,
from which the backward recomputes each tile's probabilities (FlashAttention-2, Dao 2023).

Grouped-query attention keeps K and V at their KV heads: the G query heads of a KV head are stacked
as rows of one (G·block, hd) tile, so each tile's scores are one batched matmul over (B, KV) against the
unrepeated K (head-major tiles: no transposes inside the loop). Document masking passes per-token segment ids:
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
    """(query block, key block) indices of the causal lower triangle, the tiles to visit: the diagonal
    first, so that every query row has seen itself (a finite running max) before any other tile."""
    qi, kj = np.tril_indices(n_blocks)
    order = np.argsort(qi != kj, kind="stable")
    return qi[order].astype(np.int32), kj[order].astype(np.int32)


def _get(x: jax.Array, i) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


def _set(x: jax.Array, i, value: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(x, value, i, 0)


def _add(x: jax.Array, i, value: jax.Array) -> jax.Array:
    return _set(x, i, _get(x, i) + value)


def _tiles(x: jax.Array, block: int) -> jax.Array:
    """(B, T, KV, [G,] hd) → (T/block, B, KV, [G·]block, hd): blocks first, for dynamic indexing in the scan,
    and head-major, so that every tile's scores and products are plain batched matmuls over (B, KV)
    (XLA:CPU transposes every tile otherwise)."""
    B, T, KV, hd = x.shape[0], x.shape[1], x.shape[2], x.shape[-1]
    G = x.shape[3] if x.ndim == 5 else 1
    x = x.reshape(B, T // block, block, KV, G, hd).transpose(1, 0, 3, 4, 2, 5)
    return x.reshape(T // block, B, KV, G * block, hd)


def _untiles(x: jax.Array, like: jax.Array) -> jax.Array:
    """The inverse of `_tiles`, to `like`'s shape and dtype."""
    n, B, KV, rows, hd = x.shape
    block = like.shape[1] // n
    x = x.reshape(n, B, KV, rows // block, block, hd).transpose(1, 0, 4, 2, 3, 5)
    return x.reshape(like.shape).astype(like.dtype)


def _tile_mask(i, j, block: int, G: int, sb):
    """Which (query, key) of tile (i, j) may attend: (B or 1, 1, G·bq, bk) bool. sb: (n, B, block) | None."""
    pos_q = i * block + jnp.tile(jnp.arange(block), G)  # query rows are (group, position) pairs
    pos_k = j * block + jnp.arange(block)
    mask = (pos_q[:, None] >= pos_k[None, :])[None, None]
    if sb is not None:
        seg_q, seg_k = jnp.tile(_get(sb, i), (1, G)), _get(sb, j)  # (B, G·bq), (B, bk)
        mask = mask & (seg_q[:, :, None] == seg_k[:, None, :])[:, None]
    return mask


def _scores(q_i, k_j, scale: float, mask):
    """q_i (B, KV, G·bq, hd), k_j (B, KV, bk, hd) → fp32 scaled, masked scores (B, KV, G·bq, bk)."""
    s = jnp.einsum("bkqd,bksd->bkqs", q_i, k_j, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask, s, _MASKED)


def _forward(q, k, v, seg, block: int):
    """Padded, grouped q (B, T, KV, G, hd), k, v (B, T, KV, hd), seg (B, T) | None →
    out (B, T, KV, G, hd) in q's dtype, lse (T/block, B, KV, G·block) fp32."""
    B, T, _, G, hd = q.shape
    n, scale = T // block, 1.0 / np.sqrt(hd)
    qb, kb, vb = _tiles(q, block), _tiles(k, block), _tiles(v, block)
    sb = None if seg is None else jnp.moveaxis(seg.reshape(B, n, block), 1, 0)  # (n, B, block)
    acc = jnp.zeros(qb.shape, jnp.float32)  # (n, B, KV, G·block, hd)
    m = jnp.full(qb.shape[:-1], -jnp.inf, jnp.float32)
    l = jnp.zeros(qb.shape[:-1], jnp.float32)

    def step(carry, ij):
        acc, m, l = carry
        i, j = ij
        s = _scores(_get(qb, i), _get(kb, j), scale, _tile_mask(i, j, block, G, sb))  # (B, KV, G·bq, bk)
        m_i = _get(m, i)
        m_new = jnp.maximum(m_i, s.max(-1))
        p = jnp.exp(s - m_new[..., None])  # masked scores give 0: m_new is finite (diagonal tiles come first)
        alpha = jnp.exp(m_i - m_new)  # rescales what was summed under the old max
        pv = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), _get(vb, j), preferred_element_type=jnp.float32)
        acc = _set(acc, i, _get(acc, i) * alpha[..., None] + pv)
        return (acc, _set(m, i, m_new), _set(l, i, _get(l, i) * alpha + p.sum(-1))), None

    (acc, m, l), _ = jax.lax.scan(step, (acc, m, l), block_pairs(n))
    return _untiles(acc / l[..., None], q), m + jnp.log(l)  # every query sees at least itself: l > 0


def _backward(q, k, v, seg, out, lse, d_out, block: int):
    """Gradients of q, k, v from the saved output and log-sum-exp, recomputing each tile's probabilities.

    dK and dV are accumulated transposed, (…, hd, bk), from the transposed q and dO tiles: every product is
    then a matmul whose left operand is contracted over its last axis. The untransposed dK = dSᵀ·Q contracts
    both operands over their rows, which XLA:CPU runs upcast to fp32 outside its matmul library, 5–9× slower
    (benchmarks/RESULTS.md); the transposes here are of T·hd values once per call, not of a tile per step."""
    B, T, _, G, hd = q.shape
    n, scale = T // block, 1.0 / np.sqrt(hd)
    qb, kb, vb, dob = _tiles(q, block), _tiles(k, block), _tiles(v, block), _tiles(d_out, block)
    q_t, do_t = jnp.swapaxes(qb, -1, -2), jnp.swapaxes(dob, -1, -2)  # (n, B, KV, hd, G·bq)
    sb = None if seg is None else jnp.moveaxis(seg.reshape(B, n, block), 1, 0)
    # delta = Σ_d dO·O: the softmax backward's row term, once per query.
    delta = jnp.sum(dob.astype(jnp.float32) * _tiles(out, block).astype(jnp.float32), -1)  # (n, B, KV, G·bq)
    dq = jnp.zeros(qb.shape, jnp.float32)
    dk_t = jnp.zeros(kb.shape[:-2] + (hd, block), jnp.float32)  # (n, B, KV, hd, bk)
    dv_t = jnp.zeros(vb.shape[:-2] + (hd, block), jnp.float32)

    def step(carry, ij):
        dq, dk_t, dv_t = carry
        i, j = ij
        s = _scores(_get(qb, i), _get(kb, j), scale, _tile_mask(i, j, block, G, sb))
        p = jnp.exp(s - _get(lse, i)[..., None])  # masked scores give 0
        do = _get(dob, i)
        dv_t = _add(dv_t, j, jnp.einsum("bkdq,bkqs->bkds", _get(do_t, i), p.astype(do.dtype),
                                        preferred_element_type=jnp.float32))
        dp = jnp.einsum("bkqd,bksd->bkqs", do, _get(vb, j), preferred_element_type=jnp.float32)
        ds = (p * (dp - _get(delta, i)[..., None]) * scale).astype(q.dtype)  # (B, KV, G·bq, bk)
        dq = _add(dq, i, jnp.einsum("bkqs,bksd->bkqd", ds, _get(kb, j), preferred_element_type=jnp.float32))
        dk_t = _add(dk_t, j, jnp.einsum("bkdq,bkqs->bkds", _get(q_t, i), ds, preferred_element_type=jnp.float32))
        return (dq, dk_t, dv_t), None

    (dq, dk_t, dv_t), _ = jax.lax.scan(step, (dq, dk_t, dv_t), block_pairs(n))
    return _untiles(dq, q), _untiles(jnp.swapaxes(dk_t, -1, -2), k), _untiles(jnp.swapaxes(dv_t, -1, -2), v)


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

"""The TPU fast path: the Pallas splash-attention kernel that ships with jax
(`jax.experimental.pallas.ops.tpu.splash_attention`), causal, grouped-query, with segment ids.

A Mosaic kernel is opaque to XLA's sharding propagation, so under a multi-device mesh it runs inside
`shard_map`: each device attends its own rows (batch over data × fsdp) and heads (over tensor, when both
the query and key/value heads divide it), which needs no communication. Sequences are padded to a
multiple of the block (itself a multiple of 128, the TPU lane width); padded keys sit after every real
query, hidden by the causal mask. `interpret=True` runs the kernel in Pallas' interpreter, which serves
on CPU: that is how the tests check it against the reference without a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from anychip.parallel.mesh import ACTIVATION_RULES, current_mesh, spec_for

# The kernel names its residuals (output statistics) with this; the decoder's dots policies save it.
RESIDUAL_NAME = "splash_residuals"
_LANE = 128


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, T: int, block: int, interpret: bool) -> sa.splash_attention_kernel.SplashAttentionKernel:
    """The kernel for `heads` query heads over padded length T (mask tables are built here, in numpy)."""
    mask = sa.MultiHeadMask([sa.CausalMask((T, T)) for _ in range(heads)])
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              residual_checkpoint_name=RESIDUAL_NAME, interpret=interpret)


def _local(q, k, v, seg=None, *, block: int, interpret: bool):
    """One device's part: q (b, T, h, hd), k, v (b, T, kv, hd), seg (b, T) | None → (b, T, h, hd)."""
    T, H, hd = q.shape[1:]
    kernel = _kernel(H, T, block, interpret)
    # The kernel takes head-major (heads, T, hd) per row and does not scale the scores.
    qh = (q * np.asarray(1.0 / np.sqrt(hd), q.dtype)).swapaxes(1, 2)
    kh, vh = k.swapaxes(1, 2), v.swapaxes(1, 2)
    if seg is None:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(q=s, kv=s)))(qh, kh, vh, seg)
    return out.swapaxes(1, 2).astype(q.dtype)  # (b, h, T, hd) → (b, T, h, hd)


def _specs(q: jax.Array, k: jax.Array, mesh) -> tuple[P, P, P]:
    """shard_map specs for q, k/v and segments: rows over the batch axes, heads over tensor where both divide."""
    q_spec = spec_for(("batch", "seq", "heads", "head_dim"), q.shape, mesh, ACTIVATION_RULES)
    kv_spec = spec_for(("batch", "seq", "kv_heads", "head_dim"), k.shape, mesh, ACTIVATION_RULES)
    if q_spec[2] != kv_spec[2]:  # one divides tensor, the other not: keep heads whole on both
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    return q_spec, kv_spec, P(q_spec[0], None)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None = None,
                     *, block: int = 512, interpret: bool = False) -> jax.Array:
    """Causal attention: q (B, T, H, hd), k, v (B, T, KV, hd) → (B, T, H, hd); segments (B, T) | None."""
    T = q.shape[1]
    block = min(block, -(-T // _LANE) * _LANE)
    pad = -T % block

    def padded(x, value=0):
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)

    q, k, v = padded(q), padded(k), padded(v)
    seg = None if segments is None else padded(segments.astype(jnp.int32), -1)
    local = functools.partial(_local, block=block, interpret=interpret)
    mesh = current_mesh()
    if mesh is not None and mesh.size > 1:
        q_spec, kv_spec, seg_spec = _specs(q, k, mesh)
        specs = (q_spec, kv_spec, kv_spec) + (() if seg is None else (seg_spec,))
        run = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)
        out = run(q, k, v, *(() if seg is None else (seg,)))
    else:
        out = local(q, k, v, seg)
    return out[:, :T]

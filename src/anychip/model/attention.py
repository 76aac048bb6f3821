"""Causal grouped-query attention: the kernels and which one each chip gets (docs/attention.md).

* `xla`: the reference. Plain einsums and a softmax in fp32 over the whole T×T score matrix; it lowers
  to StableHLO every PJRT backend compiles, and keeps the scores per head (memory ∝ T²).
* `blockwise`: the portable flash attention (model/blockwise.py): pure JAX, key blocks with an online
  softmax, no T×T buffer; lowers to plain StableHLO (static loops, no custom calls), so it runs on CPU,
  GPU, TPU and Trainium alike. `auto` picks it everywhere but NVIDIA and TPU.
* `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, a cuDNN custom call: NVIDIA only.
* `splash`: the Pallas TPU splash-attention kernel that ships with jax (model/splash.py): TPU only.

Every kernel takes `segments` (B, T) document ids for document masking (a query sees only keys of its own
document), or None for one document per row.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from anychip.model.blockwise import blockwise_attention

AttentionImpl = Literal["auto", "xla", "blockwise", "cudnn", "splash"]
Kernel = Literal["xla", "blockwise", "cudnn", "splash"]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """q: (B, T, H, hd); k, v: (B, S, KV, hd) with KV dividing H → (B, T, H, hd).

    mask: (B or 1, T, S) bool, True where a query may attend a key (KV-cache decoding, documents); None
    means causal, T == S.
    """
    B, T, H, hd = q.shape
    S, kv = k.shape[1], k.shape[2]
    G = H // kv
    # Head-major, each kv head's G query heads stacked along the rows: both products are plain batched
    # matmuls over (B, KV) with the contraction last, which XLA:CPU's matmul library takes without the
    # T×T transposes a (B, T, KV, G) score layout costs. Only q, k, v and the output (T·H·hd) move.
    q = q.reshape(B, T, kv, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, kv, G * T, hd)  # (B, KV, G·T, hd)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, KV, S, hd)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32).reshape(B, kv, G, T, S)
    allowed = jnp.tril(jnp.ones((T, S), dtype=bool)) if mask is None else mask[:, None, None]  # (B, 1, 1, T, S)
    scores = jnp.where(allowed, scores / jnp.sqrt(hd).astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # softmax statistics in fp32, then compute dtype
    out = jnp.einsum("bkqs,bksd->bkqd", probs.reshape(B, kv, G * T, S), v, preferred_element_type=jnp.float32)
    out = out.reshape(B, kv, G, T, hd).transpose(0, 3, 1, 2, 4)  # (B, T, KV, G, hd)
    return out.reshape(B, T, H, hd).astype(q.dtype)


def causal_mask(T: int, segments: jax.Array | None = None) -> jax.Array:
    """(B or 1, T, T) bool: key at or before the query, and (with segments (B, T)) in the same document."""
    mask = jnp.tril(jnp.ones((T, T), dtype=bool))[None]
    if segments is None:
        return mask
    return mask & (segments[:, :, None] == segments[:, None, :])


def document_segments(tokens: jax.Array, eot_id: int) -> jax.Array:
    """tokens (B, T) → document ids (B, T): the number of end-of-text tokens before each position, so an
    end-of-text token belongs to the document it ends."""
    is_eot = (tokens == eot_id).astype(jnp.int32)
    return jnp.cumsum(is_eot, axis=1) - is_eot


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None = None) -> jax.Array:
    # The public API has no segment ids; documents go in as a boolean mask (B, 1, T, T), which cuDNN
    # takes as an additive bias: one T×T per row, not per head.
    mask = None if segments is None else causal_mask(q.shape[1], segments)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def resolve(impl: AttentionImpl, backend: str | None = None) -> Kernel:
    """`auto` picks cuDNN on NVIDIA GPUs, the Pallas splash kernel on TPU, blockwise everywhere else."""
    if impl != "auto":
        return impl
    if backend is None:
        backend = jax.default_backend()
        # JAX names both CUDA and ROCm "gpu"; the client's platform version tells them apart.
        if backend == "gpu" and "rocm" in str(getattr(jax.devices()[0].client, "platform_version", "")).lower():
            backend = "rocm"
    if backend in ("gpu", "cuda"):
        return "cudnn"
    return "splash" if backend == "tpu" else "blockwise"


def kernel_for(impl: AttentionImpl, compute_dtype: Any, backend: str | None = None) -> Kernel:
    """The kernel a step in `compute_dtype` runs: cuDNN takes bf16/fp16 only, so fp32 falls back to blockwise.
    Blockwise also where T is one tile: it keeps no probabilities for the backward, and on CPU it beats the
    reference there too (tiny 8×256: 1.19× vs 0.97× transformers; demo: 0.85× vs 0.77×, benchmarks/RESULTS.md)."""
    kernel = resolve(impl, backend)
    return "blockwise" if kernel == "cudnn" and jnp.dtype(compute_dtype) == jnp.float32 else kernel


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: Kernel = "xla", segments: jax.Array | None = None,
              block: int = 512) -> jax.Array:
    """Causal attention with kernel `impl`; `block`: the blockwise and splash kernels' tile size."""
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segments)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, segments, block=block)
    if impl == "splash":
        from anychip.model.splash import splash_attention  # Pallas TPU: imported only where it is used

        return splash_attention(q, k, v, segments, block=block)
    return xla_attention(q, k, v, None if segments is None else causal_mask(q.shape[1], segments))

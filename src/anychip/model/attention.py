"""Causal grouped-query attention: a portable XLA reference and the cuDNN flash kernel on NVIDIA GPUs.

The portable path is plain einsums and a softmax in fp32: it lowers to StableHLO that every PJRT
backend compiles (CPU, GPU, TPU, Neuron) with no custom calls. The cuDNN path goes through
`jax.nn.dot_product_attention(implementation="cudnn")`, which emits a cuDNN custom call and so
only compiles for CUDA; tests check it against the reference wherever a GPU is present.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

AttentionImpl = Literal["auto", "xla", "cudnn"]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """q: (B, T, H, hd); k, v: (B, S, KV, hd) with KV dividing H → (B, T, H, hd).

    mask: (B, T, S) bool, True where a query may attend a key (KV-cache decoding); None means causal, T == S.
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


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def resolve(impl: AttentionImpl, backend: str | None = None) -> Literal["xla", "cudnn"]:
    """`auto` picks cuDNN on NVIDIA GPUs and the portable path everywhere else (ROCm included)."""
    if impl != "auto":
        return impl
    if backend is None:
        backend = jax.default_backend()
        # JAX names both CUDA and ROCm "gpu"; the client's platform version tells them apart.
        if backend == "gpu" and "rocm" in str(getattr(jax.devices()[0].client, "platform_version", "")).lower():
            backend = "rocm"
    return "cudnn" if backend in ("gpu", "cuda") else "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: Literal["xla", "cudnn"] = "xla") -> jax.Array:
    if impl == "cudnn":
        return cudnn_attention(q, k, v)
    return xla_attention(q, k, v)

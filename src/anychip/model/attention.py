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
    kv = k.shape[2]
    q = q.reshape(B, T, kv, H // kv, hd)  # (B, T, KV, G, hd): query heads grouped by the kv head they share
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(hd)
    allowed = jnp.tril(jnp.ones((T, T), dtype=bool)) if mask is None else mask[:, None, None]  # (B, 1, 1, T, S)
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # softmax statistics in fp32, then compute dtype
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
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

"""A Llama/AFM-class decoder as pure functions over a parameter pytree (its table: `params.py`).

Pre-norm RMSNorm, rotary position embeddings (HF "rotate half" layout, so weights export to
transformers without permutation), grouped-query attention with optional QK-norm, SwiGLU MLP,
tied or untied embeddings. The layers' parameters are stacked on a leading axis and run with
`lax.scan`, so compile time does not grow with depth.

Parameters are stored in `param_dtype` (fp32 master weights) and cast to `compute_dtype` at use;
norms, softmax statistics and logits are computed in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from anychip.config import ModelConfig
from anychip.model.attention import attention, xla_attention
from anychip.model.params import Params
from anychip.parallel.mesh import constrain

Remat = Literal["none", "full", "dots", "dots_no_batch"]

# The cuDNN flash-attention forward (jax.nn.dot_product_attention): a custom call, not a dot, so the dot
# policies alone would run it again in the backward pass. Its outputs (attention output and softmax
# statistics: ~D + H values per token) are worth keeping. The name is jax/_src/cudnn's; a test counts the
# forward calls in the exported CUDA step, so a rename shows.
_FLASH_ATTENTION_PRIMITIVE = "dot_product_attention_fwd_wrapper"


def _and_flash_attention(policy: Callable) -> Callable:
    def saveable(prim: Any, *args: Any, **params: Any) -> bool:
        return prim.name == _FLASH_ATTENTION_PRIMITIVE or policy(prim, *args, **params)

    return saveable


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": _and_flash_attention(jax.checkpoint_policies.checkpoint_dots),
    "dots_no_batch": _and_flash_attention(jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
}


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * x32).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (..., T, head_dim) for integer positions (..., T)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (..., T, hd/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (..., T, hd): HF "rotate half" layout
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, T, heads, hd); cos, sin: (B or 1, T, hd)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return out.astype(x.dtype)


def project_qkv(x: jax.Array, layer: Params, cfg: ModelConfig, cos: jax.Array, sin: jax.Array):
    """Normed input x (B, T, D) → rotated q (B, T, H, hd) and k, v (B, T, KV, hd)."""
    dt = x.dtype
    q = jnp.einsum("btd,dhk->bthk", x, layer["wq"].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x, layer["wk"].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x, layer["wv"].astype(dt))
    if cfg.qk_norm:
        q = rms_norm(q, layer["q_norm"], cfg.norm_eps)
        k = rms_norm(k, layer["k_norm"], cfg.norm_eps)
    q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "heads", "head_dim"))
    k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "kv_heads", "head_dim"))
    return q, k, constrain(v, ("batch", "seq", "kv_heads", "head_dim"))


def mlp(x: jax.Array, layer: Params) -> jax.Array:
    dt = x.dtype
    gate = jnp.einsum("btd,df->btf", x, layer["w_gate"].astype(dt))
    up = jnp.einsum("btd,df->btf", x, layer["w_up"].astype(dt))
    hidden = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))  # (B, T, F)
    return jnp.einsum("btf,fd->btd", hidden, layer["w_down"].astype(dt))


def decoder_block(x, layer: Params, cfg: ModelConfig, cos, sin, attend: Callable) -> tuple[jax.Array, Any]:
    """One pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). x: (B, T, D).

    `attend(q, k, v) -> (out (B, T, H, hd), aux)` is the only part that differs between training (causal
    attention over the sequence) and KV-cache decoding (write k, v into the cache, attend to it); aux
    (e.g. the updated cache) is returned next to the block's output.
    """
    q, k, v = project_qkv(rms_norm(x, layer["attn_norm"], cfg.norm_eps), layer, cfg, cos, sin)
    attn, aux = attend(q, k, v)  # (B, T, H, hd)
    x = x + jnp.einsum("bthk,hkd->btd", attn, layer["wo"].astype(x.dtype))
    x = x + mlp(rms_norm(x, layer["mlp_norm"], cfg.norm_eps), layer)
    return constrain(x, ("batch", "seq", "embed")), aux


def decoder_layer(x, layer: Params, cfg: ModelConfig, cos, sin, attention_impl: str) -> jax.Array:
    """The training block: causal attention over the whole sequence. x: (B, T, D)."""
    return decoder_block(x, layer, cfg, cos, sin, lambda q, k, v: (attention(q, k, v, attention_impl), None))[0]


def hidden_states(
    params: Params,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    compute_dtype: Any = jnp.bfloat16,
    remat: Remat = "none",
    attention_impl: str = "xla",
    unroll: bool = False,
) -> jax.Array:
    """tokens (B, T) int → final-normed hidden states (B, T, D) in compute dtype; unroll: the layers as
    straight-line code rather than a loop (same math)."""
    # The table as used: gathered over fsdp like every FSDP weight, vocab still split over tensor, so the
    # lookup is a masked local gather + all-reduce rather than a reshuffle of the whole table.
    table = constrain(params["embed"], ("vocab", "embed"))  # (V, D)
    x = constrain(table[tokens].astype(compute_dtype), ("batch", "seq", "embed"))  # (B, T, D)
    positions = jnp.arange(tokens.shape[1])[None, :]
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_base)  # (1, T, hd)

    def body(x, layer):
        return decoder_layer(x, layer, cfg, cos, sin, attention_impl), None

    if remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[remat], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, params["layers"], unroll=unroll)
    return rms_norm(x, params["final_norm"], cfg.norm_eps)


class KVCache(NamedTuple):
    """Keys and values of every layer; cache slot s holds sequence position s (positions are per row).

    (B, KV) lead the slots so that attention's batched matmuls read the cache without a transpose.
    """

    k: jax.Array  # (L, B, KV, S, hd)
    v: jax.Array  # (L, B, KV, S, hd)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32) -> KVCache:
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, length, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def cached_hidden_states(
    params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache, cfg: ModelConfig,
    *, compute_dtype: Any = jnp.float32,
) -> tuple[jax.Array, KVCache]:
    """KV-cache decoding: tokens (B, T) at sequence positions (B, T) → final-normed hidden states (B, T, D)
    and the cache with their keys and values written at slot = position.

    Each query attends to every slot at or before its own position, so with right-padded prompts the
    padding slots (after a row's last real token) are never seen: decoding overwrites them in order.
    """
    x = params["embed"][tokens].astype(compute_dtype)  # (B, T, D)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_base)  # (B, T, hd)
    rows = jnp.arange(tokens.shape[0])[:, None]  # (B, 1), broadcasts against positions (B, T)
    mask = jnp.arange(cache.k.shape[3])[None, None, :] <= positions[..., None]  # (B, T, S)

    def body(carry, layer_and_index):
        x, cache = carry
        layer, i = layer_and_index

        def attend(q, k, v):
            # Indices i, rows, positions broadcast to (B, T) and come first, the sliced KV axis after:
            # the update is (B, T, KV, hd), exactly k's shape.
            kc = cache.k.at[i, rows, :, positions].set(k.astype(cache.k.dtype))
            vc = cache.v.at[i, rows, :, positions].set(v.astype(cache.v.dtype))
            out = xla_attention(q, kc[i].swapaxes(1, 2), vc[i].swapaxes(1, 2), mask)  # (B, S, KV, hd) views
            return out, KVCache(kc, vc)

        x, cache = decoder_block(x, layer, cfg, cos, sin, attend)
        return (x, cache), None

    (x, cache), _ = jax.lax.scan(body, (x, cache), (params["layers"], jnp.arange(cfg.n_layers)))
    return rms_norm(x, params["final_norm"], cfg.norm_eps), cache


def unembedding(params: Params, cfg: ModelConfig) -> jax.Array:
    """The (D, V) output projection: the embedding table's transpose when tied."""
    return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def unembed(params: Params, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Hidden states (..., D) → fp32 logits (..., V), the matmul in compute dtype with fp32 accumulation."""
    w = unembedding(params, cfg)
    return jnp.einsum("...d,dv->...v", h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig, **kwargs: Any) -> jax.Array:
    """tokens (B, T) → fp32 logits (B, T, V). kwargs: compute_dtype, remat, attention_impl, unroll."""
    logits = unembed(params, hidden_states(params, tokens, cfg, **kwargs), cfg)
    return constrain(logits, ("batch", "seq", "vocab"))

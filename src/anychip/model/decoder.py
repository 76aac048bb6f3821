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
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from anychip.config import ModelConfig
from anychip.model.attention import Kernel, attention, document_segments, xla_attention
from anychip.model.blockwise import SAVED_NAMES
from anychip.model.params import Params
from anychip.parallel.mesh import constrain

Remat = Literal["none", "full", "dots", "dots_no_batch"]

# The cuDNN flash-attention forward (jax.nn.dot_product_attention): a custom call, not a dot, so the dot
# policies alone would run it again in the backward pass. Its outputs (attention output and softmax
# statistics: ~D + H values per token) are worth keeping. The name is jax/_src/cudnn's; a test counts the
# forward calls in the exported CUDA step, so a rename shows. The blockwise and splash kernels name their
# residuals (output, log-sum-exp) with checkpoint_name instead, and so does `dense`, whose dots a policy
# cannot see inside its custom_vjp: the dot policies keep its output as they keep an einsum's.
_FLASH_ATTENTION_PRIMITIVE = "dot_product_attention_fwd_wrapper"
_DENSE_NAME = "dense_out"
_SAVED_NAMES = jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES, "splash_residuals", _DENSE_NAME)


def _and_kernel_outputs(policy: Callable) -> Callable:
    def saveable(prim: Any, *args: Any, **params: Any) -> bool:
        return (prim.name == _FLASH_ATTENTION_PRIMITIVE or _SAVED_NAMES(prim, *args, **params)
                or policy(prim, *args, **params))

    return saveable


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": _and_kernel_outputs(jax.checkpoint_policies.checkpoint_dots),
    "dots_no_batch": _and_kernel_outputs(jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
}


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * x32).astype(x.dtype)


def _contract(lhs: range, rhs: range) -> tuple:
    """dot_general dimension numbers: contract lhs's axes with rhs's, no batch axes."""
    return (tuple(lhs), tuple(rhs)), ((), ())


def dense(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """x (..., *in) · w (*in, *out) → (..., *out) in x's dtype, `n_in` the number of `in` axes; w (an fp32
    master weight) is cast to x's dtype. Every dot, forward and backward, takes compute-dtype operands and
    accumulates in fp32, and the weight's gradient stays fp32. Written out because XLA:CPU runs a bf16 dot
    with a bf16 result (what autodiff of a plain einsum makes) by upcasting both operands to fp32, while one
    with an fp32 result runs on bf16 instructions; on TPU and GPU the two are the same program."""
    return checkpoint_name(_dense(x, w, n_in), _DENSE_NAME)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    return jax.lax.dot_general(x, w.astype(x.dtype), _contract(range(x.ndim - n_in, x.ndim), range(n_in)),
                               preferred_element_type=jnp.float32).astype(x.dtype)


def _dense_fwd(x: jax.Array, w: jax.Array, n_in: int):
    return _dense(x, w, n_in), (x, w)


def _dense_bwd(n_in: int, residuals: tuple, dy: jax.Array):
    x, w = residuals
    lead = x.ndim - n_in
    dx = jax.lax.dot_general(dy, w.astype(x.dtype), _contract(range(lead, dy.ndim), range(n_in, w.ndim)),
                             preferred_element_type=jnp.float32)
    dw = jax.lax.dot_general(x, dy, _contract(range(lead), range(lead)), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def rope_tables(positions: jax.Array | np.ndarray, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (..., T, head_dim) for integer positions (..., T).

    Positions known at trace time (a numpy array: training's 0..T-1) give tables computed here once, as
    constants of the program; traced ones are computed in it. XLA fuses the table's cos and sin into each
    consumer and so recomputes them per batch row and head: on the CPU that was about 10% of the demo
    train step's thread time."""
    xp = np if isinstance(positions, np.ndarray) else jnp
    inv_freq = 1.0 / (base ** (xp.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    angles = positions.astype(np.float32)[..., None] * inv_freq  # (..., T, hd/2)
    angles = xp.concatenate([angles, angles], axis=-1)  # (..., T, hd): HF "rotate half" layout
    return jnp.asarray(xp.cos(angles)), jnp.asarray(xp.sin(angles))


@jax.custom_vjp
def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, T, heads, hd); cos, sin: (B or 1, T, hd), functions of integer positions (no gradient)."""
    return _rotate(x, cos, sin)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return out.astype(x.dtype)


def _apply_rope_fwd(x: jax.Array, cos: jax.Array, sin: jax.Array):
    return _rotate(x, cos, sin), (cos, sin)


def _apply_rope_bwd(residuals: tuple, dy: jax.Array):
    """The rotation is orthogonal and sin repeats over both halves, so its transpose is the rotation by
    −angle: one pass like the forward. Autodiff's transpose of the concatenate (slices, pads and adds,
    read through the attention tiles' layout) took 3-4x the forward's time on XLA:CPU."""
    cos, sin = residuals
    return _rotate(dy, cos, -sin), jnp.zeros_like(cos), jnp.zeros_like(sin)


apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)


def project_qkv(x: jax.Array, layer: Params, cfg: ModelConfig, cos: jax.Array, sin: jax.Array):
    """Normed input x (B, T, D) → rotated q (B, T, H, hd) and k, v (B, T, KV, hd)."""
    q = dense(x, layer["wq"])
    k = dense(x, layer["wk"])
    v = dense(x, layer["wv"])
    if cfg.qk_norm:
        q = rms_norm(q, layer["q_norm"], cfg.norm_eps)
        k = rms_norm(k, layer["k_norm"], cfg.norm_eps)
    q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "heads", "head_dim"))
    k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "kv_heads", "head_dim"))
    return q, k, constrain(v, ("batch", "seq", "kv_heads", "head_dim"))


def mlp(x: jax.Array, layer: Params) -> jax.Array:
    gate = dense(x, layer["w_gate"])
    up = dense(x, layer["w_up"])
    hidden = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))  # (B, T, F)
    return dense(hidden, layer["w_down"])


def decoder_block(x, layer: Params, cfg: ModelConfig, cos, sin, attend: Callable) -> tuple[jax.Array, Any]:
    """One pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). x: (B, T, D).

    `attend(q, k, v) -> (out (B, T, H, hd), aux)` is the only part that differs between training (causal
    attention over the sequence) and KV-cache decoding (write k, v into the cache, attend to it); aux
    (e.g. the updated cache) is returned next to the block's output.
    """
    q, k, v = project_qkv(rms_norm(x, layer["attn_norm"], cfg.norm_eps), layer, cfg, cos, sin)
    attn, aux = attend(q, k, v)  # (B, T, H, hd)
    x = x + dense(attn, layer["wo"], 2)
    x = x + mlp(rms_norm(x, layer["mlp_norm"], cfg.norm_eps), layer)
    return constrain(x, ("batch", "seq", "embed")), aux


def decoder_layer(x, layer: Params, cfg: ModelConfig, cos, sin, attend: Callable) -> jax.Array:
    """The training block: causal attention over the whole sequence. x: (B, T, D)."""
    return decoder_block(x, layer, cfg, cos, sin, lambda q, k, v: (attend(q, k, v), None))[0]


def hidden_states(
    params: Params,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    compute_dtype: Any = jnp.bfloat16,
    remat: Remat = "none",
    attention_impl: Kernel = "xla",
    attention_block: int = 512,
    eot_id: int | None = None,
    unroll: bool = False,
) -> jax.Array:
    """tokens (B, T) int → final-normed hidden states (B, T, D) in compute dtype.

    eot_id: document masking, each token attends only within its document (documents end at eot_id).
    unroll: the layers as straight-line code (XLA's cost analysis counts a scan's body once; compile time
    grows with depth)."""
    # The table as used: gathered over fsdp like every FSDP weight, vocab still split over tensor, so the
    # lookup is a masked local gather + all-reduce rather than a reshuffle of the whole table.
    table = constrain(params["embed"], ("vocab", "embed"))  # (V, D)
    x = constrain(table[tokens].astype(compute_dtype), ("batch", "seq", "embed"))  # (B, T, D)
    cos, sin = rope_tables(np.arange(tokens.shape[1])[None, :], cfg.head_dim, cfg.rope_base)  # (1, T, hd)
    segments = None if eot_id is None else document_segments(tokens, eot_id)  # (B, T)

    def attend(q, k, v):
        return attention(q, k, v, attention_impl, segments, attention_block)

    def body(x, layer):
        return decoder_layer(x, layer, cfg, cos, sin, attend), None

    if remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[remat], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, params["layers"], unroll=cfg.n_layers if unroll else 1)
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
    *, compute_dtype: Any = jnp.float32, prefill: Kernel | None = None, unroll: bool = False,
) -> tuple[jax.Array, KVCache]:
    """KV-cache decoding: tokens (B, T) at sequence positions (B, T) → final-normed hidden states (B, T, D)
    and the cache with their keys and values written at slot = position.

    Each query attends to every slot at or before its own position, so with right-padded prompts the
    padding slots (after a row's last real token) are never seen: decoding overwrites them in order.
    prefill: a kernel for the first call, whose positions are 0..T-1 of an empty cache; the tokens then
    attend only to each other, causally, with that kernel (no (T, S) scores over the whole cache).
    """
    table = constrain(params["embed"], ("vocab", "embed"))  # as in hidden_states: a local gather + all-reduce
    x = constrain(table[tokens].astype(compute_dtype), ("batch", "seq", "embed"))  # (B, T, D)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_base)  # (B, T, hd)
    rows = jnp.arange(tokens.shape[0])[:, None]  # (B, 1), broadcasts against positions (B, T)
    mask = jnp.arange(cache.k.shape[3])[None, None, :] <= positions[..., None]  # (B, T, S)

    def body(carry, layer_and_index):
        x, cache = carry
        layer, i = layer_and_index

        def attend(q, k, v):
            if prefill is not None:  # slots 0..T-1 of layer i: one contiguous write, not a T-row scatter
                def write(c, x):
                    return jax.lax.dynamic_update_slice(c, x.swapaxes(1, 2)[None].astype(c.dtype), (i, 0, 0, 0, 0))

                return attention(q, k, v, prefill), KVCache(write(cache.k, k), write(cache.v, v))
            # Indices i, rows, positions broadcast to (B, T) and come first, the sliced KV axis after:
            # the update is (B, T, KV, hd), exactly k's shape.
            kc = cache.k.at[i, rows, :, positions].set(k.astype(cache.k.dtype))
            vc = cache.v.at[i, rows, :, positions].set(v.astype(cache.v.dtype))
            out = xla_attention(q, kc[i].swapaxes(1, 2), vc[i].swapaxes(1, 2), mask)  # (B, S, KV, hd) views
            return out, KVCache(kc, vc)

        x, cache = decoder_block(x, layer, cfg, cos, sin, attend)
        return (x, cache), None

    layers = (params["layers"], jnp.arange(cfg.n_layers))
    (x, cache), _ = jax.lax.scan(body, (x, cache), layers, unroll=cfg.n_layers if unroll else 1)
    return rms_norm(x, params["final_norm"], cfg.norm_eps), cache


def unembedding(params: Params, cfg: ModelConfig) -> jax.Array:
    """The (D, V) output projection: the embedding table's transpose when tied."""
    return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def unembed(params: Params, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Hidden states (..., D) → fp32 logits (..., V), the matmul in compute dtype with fp32 accumulation."""
    w = unembedding(params, cfg)
    return jnp.einsum("...d,dv->...v", h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig, **kwargs: Any) -> jax.Array:
    """tokens (B, T) → fp32 logits (B, T, V). kwargs: those of `hidden_states`."""
    logits = unembed(params, hidden_states(params, tokens, cfg, **kwargs), cfg)
    return constrain(logits, ("batch", "seq", "vocab"))

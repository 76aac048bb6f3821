"""Sampling with a KV cache: one compiled prefill-and-decode loop per (batch, prompt bucket, cache bucket).

Prompts are right-padded to a power-of-two length P and the cache to a power-of-two length S ≥ P +
max_new_tokens, so prompts of any length in a bucket and any `max_new_tokens` that fits reuse the same
compiled function. Cache slot s holds sequence position s: a row's padding sits after its last real token,
where the causal mask hides it until decoding overwrites it, so positions (and RoPE) are the same as in
a full forward pass over the unpadded prompt. The decode loop is a `lax.while_loop` that stops once every
row has produced a stop token or `max_new_tokens` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anychip.config import ModelConfig
from anychip.data.chat import PromptTokenizer, stop_index
from anychip.errors import UserError
from anychip.model.attention import kernel_for
from anychip.model.decoder import cached_hidden_states, init_cache, unembed
from anychip.model.params import Params, is_norm

_MIN_BUCKET = 16


def _bucket(n: int, smallest: int = _MIN_BUCKET) -> int:
    """Next power of two ≥ n (at least `smallest`): one compiled function per bucket, not per length."""
    return max(smallest, 1 << (n - 1).bit_length())


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits of each row (ties with the k-th are kept too), the rest → -inf."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # (..., 1)
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: jax.Array | float) -> jax.Array:
    """Keep the nucleus: the fewest most-probable tokens whose total probability reaches p; the rest → -inf."""
    probs = jax.nn.softmax(logits, axis=-1)
    desc = -jnp.sort(-probs, axis=-1)  # (..., V) probabilities, largest first
    mass_before = jnp.cumsum(desc, axis=-1) - desc  # probability of the tokens ranked above each one
    smallest_kept = jnp.min(jnp.where(mass_before < p, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(probs < smallest_kept, -jnp.inf, logits)


def sample(
    logits: jax.Array, key: jax.Array, temperature: jax.Array | float, top_p: jax.Array | float,
    *, greedy: bool, top_k: int, use_top_p: bool,
) -> jax.Array:
    """logits (B, V) → token ids (B,): argmax when greedy, else temperature → top-k → top-p → categorical."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        logits = top_k_filter(logits, top_k)
    if use_top_p:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _cast_matrices(params: Params, cfg: ModelConfig, dtype: Any) -> Params:
    """Cast weight matrices to the compute dtype once, not at every decode step; norm weights stay fp32."""
    return jax.tree.map(lambda x, norm: x if norm else x.astype(dtype), params, is_norm(cfg))


@partial(jax.jit, static_argnames=("cfg", "cache_len", "greedy", "top_k", "use_top_p", "compute_dtype"))
def _decode(
    params: Params, tokens: jax.Array, lengths: jax.Array, n_new: jax.Array, key: jax.Array,
    temperature: jax.Array, top_p: jax.Array, is_stop: jax.Array,
    *, cfg: ModelConfig, cache_len: int, greedy: bool, top_k: int, use_top_p: bool, compute_dtype: Any,
) -> jax.Array:
    """Right-padded prompts (B, P) with `lengths` (B,) → new tokens (B, cache_len - P), -1 once a row has stopped."""
    B, P = tokens.shape
    params = _cast_matrices(params, cfg, compute_dtype)
    pick = partial(sample, temperature=temperature, top_p=top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    run = partial(cached_hidden_states, params, cfg=cfg, compute_dtype=compute_dtype)

    positions = jnp.broadcast_to(jnp.arange(P), (B, P))
    prefill = kernel_for("auto", compute_dtype)  # the prompt attends to itself with the chip's fast kernel
    h, cache = run(tokens, positions, init_cache(cfg, B, cache_len, compute_dtype), prefill=prefill)  # (B, P, D)
    tok = pick(unembed(params, h[jnp.arange(B), lengths - 1], cfg), jax.random.fold_in(key, 0))  # (B,)
    out = jnp.full((B, cache_len - P), -1, jnp.int32).at[:, 0].set(tok)

    def keep_going(state):
        t, _, _, done, _ = state
        return (t < n_new) & ~jnp.all(done)

    def step(state):
        t, tok, cache, done, out = state
        h, cache = run(tok[:, None], (lengths + t - 1)[:, None], cache)  # token t-1 sits at position length+t-1
        tok = pick(unembed(params, h[:, 0], cfg), jax.random.fold_in(key, t))
        out = out.at[:, t].set(jnp.where(done, -1, tok))
        return t + 1, tok, cache, done | is_stop[tok], out

    *_, out = jax.lax.while_loop(keep_going, step, (jnp.int32(1), tok, cache, is_stop[tok], out))
    return out


def _check_request(cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                   top_k: int, top_p: float, stop_tokens: tuple[int, ...]) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("generate needs at least one prompt and every prompt needs at least one token")
    ids = [t for p in prompts for t in p] + list(stop_tokens)
    if min(ids) < 0 or max(ids) >= cfg.vocab_size:
        raise UserError(f"token ids must be in [0, {cfg.vocab_size}), got {min(ids)}..{max(ids)}")
    if not (max_new_tokens >= 0 and top_k >= 0 and 0 <= temperature < math.inf and 0 < top_p <= 1):  # NaN fails
        raise UserError(f"need max_new_tokens >= 0, a finite temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                        f"{max_new_tokens}, {temperature}, {top_k}, {top_p}")
    longest = max(len(p) for p in prompts)
    if longest >= cfg.max_seq_len:
        raise UserError(f"a prompt of {longest} tokens leaves no room in the model's max_seq_len={cfg.max_seq_len}")


def generate(
    params: Params,
    cfg: ModelConfig,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_tokens: tuple[int, ...] = (),
    compute_dtype: Any = jnp.float32,
) -> list[list[int]]:
    """Continue each prompt (token ids) by up to `max_new_tokens` tokens; returns the new tokens only, cut
    before the first stop token and so that the longest prompt plus its continuation fits in max_seq_len.
    temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""
    _check_request(cfg, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens)
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len - max(len(p) for p in prompts))
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    P = _bucket(max(len(p) for p in prompts))
    tokens = np.zeros((len(prompts), P), np.int32)  # right padding; the pad id is never attended to
    for row, prompt in zip(tokens, prompts):
        row[: len(prompt)] = prompt
    is_stop = np.zeros(cfg.vocab_size, bool)
    is_stop[list(stop_tokens)] = True
    out = _decode(
        params, tokens, np.array([len(p) for p in prompts], np.int32), np.int32(max_new_tokens),
        jax.random.key(seed), np.float32(temperature), np.float32(top_p), is_stop,
        cfg=cfg, cache_len=_bucket(P + max_new_tokens), greedy=temperature == 0,
        top_k=min(top_k, cfg.vocab_size), use_top_p=top_p < 1, compute_dtype=compute_dtype,
    )
    return [_until_stop(row[:max_new_tokens], stop_tokens) for row in np.asarray(out).tolist()]


def _until_stop(row: list[int], stop_tokens: tuple[int, ...]) -> list[int]:
    for i, tok in enumerate(row):
        if tok < 0 or tok in stop_tokens:
            return row[:i]
    return row


def generate_text(params: Params, cfg: ModelConfig, tokenizer: PromptTokenizer, prompt: str, *, chat: bool = False,
                  stop: Sequence[str] = (), **kwargs: Any) -> str:
    """The completion of `prompt` as text; with `chat`, the reply to `prompt` as a user message under the
    chat template. Generation ends at the tokenizer's end-of-sequence tokens (and any `stop_tokens` given);
    the text is cut before the first `stop` string. An empty prompt starts from bos: an unconditional
    sample. kwargs: those of `generate`."""
    if chat:
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    else:
        ids = tokenizer.encode(prompt) or [tokenizer.first_token()]
    kwargs["stop_tokens"] = tuple(kwargs.get("stop_tokens", ())) + tokenizer.stop_ids
    new = generate(params, cfg, [ids], **kwargs)[0]
    # Decode prompt and completion together: a character's bytes may straddle the boundary.
    prefix, text = tokenizer.decode(ids), tokenizer.decode(ids + new)
    completion = text[len(prefix):] if text.startswith(prefix) else tokenizer.decode(new)
    return completion[:stop_index(completion, stop)]

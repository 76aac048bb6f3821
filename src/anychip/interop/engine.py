"""Continuous batching: concurrent requests share one jitted KV-cache decoder in a fixed number of slots.

The cache holds `slots` sequences of up to `max_seq_len` tokens each (decoder.KVCache, (L, slots, KV, S,
hd)). A new request is prefilled into a free slot (one compiled prefill per power-of-two prompt length);
then every step decodes one token for every occupied slot at once, so N concurrent requests cost about
one step per token instead of N. A step computes the first R slots only, R the occupied slots' extent
rounded up to a power of two (new requests take the lowest free slot), and attends over the longest
sequence's length rounded the same way: one request alone costs a one-row step, not a full batch. Cache
slot s of a row holds position s, and each row attends only up to its own position, so rows at different
lengths share a step and a row never sees what an earlier request left in its slot. A sequence leaves
its slot at an end-of-sequence token, at its token budget, or when it is cancelled (a client that went
away), and a waiting request takes the slot at the next step. Requests wait in a bounded queue; a full
queue refuses new ones (the server's 429).

Sampling runs per row (temperature, top-k, top-p and seed of each request; greedy at temperature 0), and
the random key of a request's i-th token is fold_in(key(seed), i): a seeded request gets the same tokens
whatever else is running (up to the float rounding of a step with another row count). A step where no
row samples skips the random draw (on a CPU, the Gumbel noise for 32 × 8,192 logits costs more than the
model). Reported log-probabilities are those of the model's distribution before temperature and
filtering, as OpenAI-compatible servers report them.

One thread runs the loop and owns the cache. `submit` may be called from any thread; a request's events
(`Prompt`, `Token`, `Finished`) go to its `emit` callback, called on the engine's thread.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from anychip.config import ModelConfig
from anychip.model.decoder import KVCache, cached_hidden_states, init_cache, unembed
from anychip.model.generate import _bucket, _cast_matrices, top_p_filter
from anychip.model.params import Params

MAX_TOP_LOGPROBS = 20  # alternatives per position a request may ask for (vLLM's default limit too)


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full: try again later (HTTP 429)."""


class RequestError(ValueError):
    """A request the engine cannot run (too long, bad token ids): the client's mistake (HTTP 400)."""


@dataclass(frozen=True)
class Request:
    """One sequence to generate. `stop_ids` end it (the model's end-of-sequence tokens, unless ignored)."""

    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int = 0
    stop_ids: frozenset[int] = frozenset()
    top_logprobs: int = 0  # alternatives reported per generated token, at most MAX_TOP_LOGPROBS
    prompt_logprobs: bool = False  # also the log-probability of every prompt token after the first


class Prompt(NamedTuple):
    """The prompt's tokens 1.. scored: logprobs[i] is log p(prompt[i + 1] | prompt[:i + 1])."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]


class Token(NamedTuple):
    token: int
    logprob: float
    top: list[tuple[int, float]]


class Finished(NamedTuple):
    reason: str  # "stop" (an end-of-sequence token), "length" (max_tokens), "cancelled", "error"
    error: str | None = None


Event = Prompt | Token | Finished


@dataclass
class Handle:
    """What `submit` returns: cancel() frees the request's slot at the next step."""

    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Sequence:
    request: Request
    emit: Callable[[Event], None]
    handle: Handle
    generated: int = 0  # tokens sampled so far; the last one is fed to the next step
    last: int = 0

    @property
    def position(self) -> int:
        """Sequence position of the last sampled token, where the next step writes its keys and values."""
        return len(self.request.prompt) + self.generated - 1


# ---------------------------------------------------------------------------------------------
# The compiled parts


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *,
                  top_k_cap: int, use_top_p: bool) -> jax.Array:
    """Per row (B, V): temperature, then top-k (0: off; ties with the k-th kept), then top-p (1: off), as
    `generate.sample` does with one setting for the whole batch; filtered logits are -inf. top_k_cap (a
    static bound on the rows' k, 0 when none filters) and use_top_p spare the sorts when no row needs them."""
    logits = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    if top_k_cap:
        largest = jax.lax.top_k(logits, top_k_cap)[0]  # (B, cap), descending
        kth = jnp.take_along_axis(largest, (jnp.clip(top_k, 1, top_k_cap) - 1)[:, None], axis=-1)  # (B, 1)
        logits = jnp.where((top_k > 0)[:, None] & (logits < kth), -jnp.inf, logits)
    if use_top_p:
        logits = jnp.where((top_p < 1)[:, None], top_p_filter(logits, top_p[:, None]), logits)
    return logits


def _choose(logits: jax.Array, sampling: tuple[jax.Array, ...], top_k_cap: int, use_top_p: bool):
    """fp32 logits (B, V) → the sampled tokens (B,), their log-probabilities (B,) and the MAX_TOP_LOGPROBS
    most likely tokens with theirs (B, MAX_TOP_LOGPROBS) each. sampling: (seeds, steps, temperature,
    top_k, top_p), one entry per row."""
    seeds, steps, temperature, top_k, top_p = sampling
    logp = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)
        filtered = filter_logits(logits, temperature, top_k, top_p, top_k_cap=top_k_cap, use_top_p=use_top_p)
        return jnp.where(temperature > 0, jax.vmap(jax.random.categorical)(keys, filtered), greedy).astype(jnp.int32)

    token = jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)
    top_lp, top_ids = jax.lax.top_k(logp, MAX_TOP_LOGPROBS)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0], top_ids, top_lp


def _prefix(cache: KVCache, length: int, rows: int | None = None) -> KVCache:
    return KVCache(*(c[:, :rows, :, :length] for c in cache))


def _put_prefix(cache: KVCache, part: KVCache, slot: jax.Array | int = 0) -> KVCache:
    """`part` (L, b, KV, length, hd) written into `cache` at rows slot.. and positions 0.."""
    return KVCache(*(jax.lax.dynamic_update_slice(c, p, (0, slot, 0, 0, 0)) for c, p in zip(cache, part)))


@partial(jax.jit, static_argnames=("cfg", "compute_dtype", "with_prompt", "top_k_cap", "use_top_p"),
         donate_argnames="cache")
def _prefill(params: Params, cache: KVCache, slot: jax.Array, tokens: jax.Array, length: jax.Array,
             sampling: tuple[jax.Array, ...], *, cfg: ModelConfig, compute_dtype: Any, with_prompt: bool,
             top_k_cap: int, use_top_p: bool):
    """A right-padded prompt (1, P) of `length` tokens into cache row `slot`; samples its first token.
    Only the row's first P positions take part (nothing later is attended to). with_prompt: also each
    prompt token's log-probability and the top alternatives at every position."""
    P = tokens.shape[1]
    row = _prefix(KVCache(*(jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=1) for c in cache)), P)  # (L, 1, KV, P, hd)
    h, row = cached_hidden_states(params, tokens, jnp.arange(P)[None, :], row, cfg, compute_dtype=compute_dtype)
    cache = _put_prefix(cache, row, slot)
    first = _choose(unembed(params, h[:, length - 1], cfg), sampling, top_k_cap, use_top_p)
    if not with_prompt:
        return cache, first, None
    logp = jax.nn.log_softmax(unembed(params, h[0, :-1], cfg), axis=-1)  # (P-1, V): predicts tokens 1..P-1
    top_lp, top_ids = jax.lax.top_k(logp, MAX_TOP_LOGPROBS)
    return cache, first, (jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)[:, 0], top_ids, top_lp)


@partial(jax.jit, static_argnames=("cfg", "compute_dtype", "length", "top_k_cap", "use_top_p"),
         donate_argnames="cache")
def _decode_step(params: Params, cache: KVCache, tokens: jax.Array, positions: jax.Array,
                 sampling: tuple[jax.Array, ...], *, cfg: ModelConfig, compute_dtype: Any, length: int,
                 top_k_cap: int, use_top_p: bool):
    """One token for each of the first R slots, R = len(tokens): tokens (R,) at positions (R,), all <
    `length` → the cache and `_choose`'s outputs. Only those rows and the cache's first `length` positions
    are read and written: a step costs what its occupied slots and its longest sequence need, not the
    whole cache."""
    part = _prefix(cache, length, tokens.shape[0])
    h, part = cached_hidden_states(params, tokens[:, None], positions[:, None], part, cfg,
                                   compute_dtype=compute_dtype)  # (B, 1, D)
    return _put_prefix(cache, part), _choose(unembed(params, h[:, 0], cfg), sampling, top_k_cap, use_top_p)


def _row_bucket(n: int, slots: int) -> int:
    """Rows a step computes to cover the first n slots: a power of two (one compiled step per bucket), at
    most the slot count."""
    return min(_bucket(n, smallest=1), slots)


def _rows(running: list[Any]) -> int:
    """Rows the next step computes: up to the last occupied slot."""
    return _row_bucket(1 + max(i for i, seq in enumerate(running) if seq is not None), len(running))


def _sampling_arrays(requests: list[Request | None], steps: list[int]) -> tuple[np.ndarray, ...]:
    """(seeds, steps, temperature, top_k, top_p) per row; an empty slot samples greedily and is ignored."""
    rows = [r or Request((), 0, temperature=0.0) for r in requests]
    return (np.array([r.seed for r in rows], np.uint32), np.array(steps, np.int32),
            np.array([r.temperature for r in rows], np.float32), np.array([r.top_k for r in rows], np.int32),
            np.array([r.top_p for r in rows], np.float32))


def _filters(requests: list[Request], vocab_size: int) -> dict[str, Any]:
    """The static sampler variant a batch needs: top-k up to the next power of two of its largest k (one
    compiled step per bound, not per k), top-p only if a row asks for it."""
    k = max((r.top_k for r in requests if r.temperature > 0), default=0)
    return {"top_k_cap": k and min(_bucket(k), vocab_size),
            "use_top_p": any(r.top_p < 1 and r.temperature > 0 for r in requests)}


def _top(ids: np.ndarray, logprobs: np.ndarray, n: int) -> list[tuple[int, float]]:
    return [(int(i), float(lp)) for i, lp in zip(ids[:n], logprobs[:n])]


# ---------------------------------------------------------------------------------------------
# The loop


class Engine:
    """`slots` sequences of up to `max_seq_len` tokens decoded together; `max_queue` more may wait for a slot."""

    def __init__(self, params: Params, cfg: ModelConfig, *, slots: int = 8, max_seq_len: int | None = None,
                 max_queue: int = 64, compute_dtype: Any = jnp.float32, log: Callable[[str], None] = print):
        self.cfg, self.slots, self.max_queue, self.log = cfg, slots, max_queue, log
        self.max_seq_len = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        self.compute_dtype = compute_dtype
        self.params = jax.jit(_cast_matrices, static_argnums=(1, 2))(params, cfg, compute_dtype)
        # Made by a jitted function, like every later cache (a step's output): a jit specializes on whether its
        # inputs are committed to a device, and an eager zeros array is not, so warm-up would compile for nothing.
        self.cache = jax.jit(init_cache, static_argnums=(0, 1, 2, 3))(cfg, slots, self.max_seq_len, compute_dtype)
        self.running: list[_Sequence | None] = [None] * slots
        self.waiting: collections.deque[_Sequence] = collections.deque()
        self.steps = 0  # decode steps run so far (each advances every occupied slot by one token)
        self.cancelled = 0  # requests cancelled before they finished (clients that went away)
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="anychip-engine", daemon=True)

    @property
    def cache_bytes(self) -> int:
        return 2 * self.cache.k.size * self.cache.k.dtype.itemsize

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish every running and waiting request, then end the loop."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"slots": self.slots, "running": sum(s is not None for s in self.running),
                    "waiting": len(self.waiting), "steps": self.steps, "cancelled": self.cancelled}

    def check(self, request: Request) -> None:
        """Raise RequestError unless the engine can run `request` (the server checks before answering)."""
        n, limit = len(request.prompt), self.max_seq_len
        if n == 0:
            raise RequestError("the prompt is empty")
        if min(request.prompt) < 0 or max(request.prompt) >= self.cfg.vocab_size:
            raise RequestError(f"token ids must be in [0, {self.cfg.vocab_size})")
        if n + request.max_tokens > limit:
            raise RequestError(f"this model's maximum context length is {limit} tokens; the request asks for "
                               f"{n + request.max_tokens} ({n} in the prompt, {request.max_tokens} to generate)")
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top logprobs must be in [0, {MAX_TOP_LOGPROBS}]")

    def submit(self, request: Request, emit: Callable[[Event], None]) -> Handle:
        """Queue `request`; its events go to `emit` (on the engine's thread). Raises RequestError, QueueFull."""
        self.check(request)
        seq = _Sequence(request, emit, Handle())
        with self._cond:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if sum(s is not None for s in self.running) + len(self.waiting) >= self.slots + self.max_queue:
                raise QueueFull(f"all {self.slots} slots are busy and {self.max_queue} requests are waiting; "
                                "retry later")
            self.waiting.append(seq)
            self._cond.notify()
        return seq.handle

    def warm_up(self) -> float:
        """Before `start`: compile the shortest prompt bucket and the decode step for every row bucket and
        cache length, so no client waits for a compilation of the common path (greedy or plain temperature
        sampling). Returns the seconds it took."""
        assert not self._thread.is_alive(), "warm up before start()"
        t0 = time.perf_counter()
        self._prefill(0, _Sequence(Request((0,), max_tokens=0), lambda _: None, Handle()))
        for rows in sorted({_row_bucket(n, self.slots) for n in range(1, self.slots + 1)}):
            idle, sampling = np.zeros(rows, np.int32), _sampling_arrays([None] * rows, [0] * rows)
            length = 0
            while length < self.max_seq_len:
                length = min(_bucket(length + 1), self.max_seq_len)
                self.cache, out = _decode_step(self.params, self.cache, idle, idle, sampling, cfg=self.cfg,
                                               compute_dtype=self.compute_dtype, length=length,
                                               **_filters([], self.cfg.vocab_size))
        jax.block_until_ready(out)
        return time.perf_counter() - t0

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.waiting and not any(self.running):
                    self._cond.wait()
                if self._stop and not self.waiting and not any(self.running):
                    return
                admitted = self._admit()
            try:
                for slot, seq in admitted:
                    self._prefill(slot, seq)
                self._release_cancelled()
                if any(self.running):
                    self._step()
            except Exception:  # noqa: BLE001 (a failed step fails its requests, not the server)
                self.log(f"engine: step failed, failing its requests:\n{traceback.format_exc()}")
                for slot, seq in enumerate(self.running):
                    if seq is not None:
                        self._finish(slot, Finished("error", "internal error while generating"))

    def _admit(self) -> list[tuple[int, _Sequence]]:
        """Waiting requests into free slots (under the lock); cancelled ones are dropped."""
        admitted = []
        for slot in range(self.slots):
            while self.running[slot] is None and self.waiting:
                seq = self.waiting.popleft()
                if seq.handle.cancelled.is_set():
                    self.cancelled += 1
                    seq.emit(Finished("cancelled"))
                    continue
                self.running[slot] = seq
                admitted.append((slot, seq))
        return admitted

    def _prefill(self, slot: int, seq: _Sequence) -> None:
        r = seq.request
        n = len(r.prompt)
        tokens = np.zeros((1, min(_bucket(n), self.max_seq_len)), np.int32)
        tokens[0, :n] = r.prompt
        self.cache, first, prompt = _prefill(
            self.params, self.cache, np.int32(slot), tokens, np.int32(n), _sampling_arrays([r], [0]),
            cfg=self.cfg, compute_dtype=self.compute_dtype, with_prompt=r.prompt_logprobs, **_filters([r], self.cfg.vocab_size))
        if prompt is not None:
            lp, ids, top = (np.asarray(x)[:n - 1] for x in prompt)
            seq.emit(Prompt(lp.tolist(), [_top(i, t, r.top_logprobs) for i, t in zip(ids, top)]))
        if r.max_tokens == 0:
            self._finish(slot, Finished("length"))
            return
        self._advance(slot, *(np.asarray(x)[0] for x in first))

    def _step(self) -> None:
        batch = self.running[:_rows(self.running)]
        tokens = np.array([s.last if s else 0 for s in batch], np.int32)
        positions = np.array([s.position if s else 0 for s in batch], np.int32)
        sampling = _sampling_arrays([s and s.request for s in batch], [s.generated if s else 0 for s in batch])
        requests = [s.request for s in batch if s is not None]
        length = min(_bucket(int(positions.max()) + 1), self.max_seq_len)
        self.cache, out = _decode_step(self.params, self.cache, tokens, positions, sampling, cfg=self.cfg,
                                       compute_dtype=self.compute_dtype, length=length, **_filters(requests, self.cfg.vocab_size))
        token, logprob, top_ids, top_lp = (np.asarray(x) for x in out)
        self.steps += 1
        for slot, seq in enumerate(batch):
            if seq is not None:
                self._advance(slot, token[slot], logprob[slot], top_ids[slot], top_lp[slot])

    def _advance(self, slot: int, token: np.ndarray, logprob: np.ndarray, top_ids: np.ndarray,
                 top_lp: np.ndarray) -> None:
        """A slot's newly sampled token: ends its sequence at a stop token, else goes to the client."""
        seq = self.running[slot]
        assert seq is not None
        token = int(token)
        seq.generated += 1
        seq.last = token
        if token in seq.request.stop_ids:
            self._finish(slot, Finished("stop"))
            return
        seq.emit(Token(token, float(logprob), _top(top_ids, top_lp, seq.request.top_logprobs)))
        if seq.generated == seq.request.max_tokens:
            self._finish(slot, Finished("length"))

    def _release_cancelled(self) -> None:
        for slot, seq in enumerate(self.running):
            if seq is not None and seq.handle.cancelled.is_set():
                self.cancelled += 1
                self._finish(slot, Finished("cancelled"))

    def _finish(self, slot: int, event: Finished) -> None:
        seq = self.running[slot]
        with self._cond:
            self.running[slot] = None
        if seq is not None:
            seq.emit(event)

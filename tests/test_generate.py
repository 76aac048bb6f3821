"""KV-cache generation against the full forward pass, and the samplers on hand-made distributions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anychip.config import MODEL_PRESETS
from anychip.data.chat import PromptTokenizer, SpecialTokens
from anychip.data.tokenizer import train_tokenizer
from anychip.errors import UserError
from anychip.model.decoder import cached_hidden_states, forward, init_cache, unembed
from anychip.model.generate import _decode, generate, generate_text, sample, top_k_filter, top_p_filter
from anychip.model.params import init_params

# Large init so greedy continuations vary (at std 0.02 a tied tiny model just repeats its last token).
CFG = dataclasses.replace(MODEL_PRESETS["tiny"], vocab_size=300, init_std=0.3, tie_embeddings=False)
PROMPTS = [[5, 6, 7], list(range(1, 12)), [42]]
# fp32 throughout. The cached path sums attention over the S cache slots (masked ones add exact zeros)
# where the full pass sums over T, so only the reduction order differs: observed |Δlogit| ~1e-5 on
# logits of magnitude ~5 (a few fp32 ulps through 2 layers); 1e-4 leaves 10x margin.
ATOL = 1e-4


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


@jax.jit
def full_logits(params, tokens):
    return forward(params, tokens, CFG, compute_dtype=jnp.float32)  # (B, T, V)


cached_step = jax.jit(cached_hidden_states, static_argnames=("cfg", "prefill"))


def test_greedy_equals_full_forward_argmax(params):
    out = generate(params, CFG, PROMPTS, max_new_tokens=10, temperature=0)
    assert all(len(o) == 10 for o in out)
    assert len({tuple(o) for o in out}) == 3
    for prompt, new in zip(PROMPTS, out):
        argmax = np.asarray(full_logits(params, jnp.array([prompt + new]))[0]).argmax(-1)  # at every position
        np.testing.assert_array_equal(argmax[len(prompt) - 1:-1], new)


@pytest.mark.parametrize("prefill", [None, "blockwise"])  # the prompt over the whole cache, or over itself
def test_cached_logits_equal_full_forward_logits(params, prefill):
    lengths = np.array([4, 8])
    tokens = np.array([[3, 4, 5, 6, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]])  # right padded
    fed = np.array([[11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24, 25]])  # fed one at a time after the prompt
    h, cache = cached_step(params, tokens, np.broadcast_to(np.arange(8), (2, 8)), init_cache(CFG, 2, 32), cfg=CFG,
                           prefill=prefill)
    prefill = np.asarray(unembed(params, h, CFG))  # (2, 8, V)
    steps = []
    for t in range(fed.shape[1]):
        h, cache = cached_step(params, fed[:, t:t + 1], (lengths + t)[:, None], cache, cfg=CFG)
        steps.append(np.asarray(unembed(params, h[:, 0], CFG)))
    for b, n in enumerate(lengths):
        # Causal: the full pass over prompt + fed tokens gives the logits of every prefix at once.
        full = np.asarray(full_logits(params, jnp.array([list(tokens[b, :n]) + list(fed[b])]))[0])
        np.testing.assert_allclose(prefill[b, :n], full[:n], atol=ATOL)
        np.testing.assert_allclose(np.stack(steps)[:, b], full[n:], atol=ATOL)


def test_top_k_1_is_greedy(params):
    greedy = generate(params, CFG, PROMPTS, max_new_tokens=6, temperature=0)
    for seed in range(2):
        assert generate(params, CFG, PROMPTS, max_new_tokens=6, temperature=1.5, top_k=1, seed=seed) == greedy


def test_top_p_keeps_exactly_the_nucleus():
    probs = np.array([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 2), 0.05 (id 0)
    logits = jnp.log(jnp.array(probs, jnp.float32))
    for p, nucleus in [(0.45, {1}), (0.75, {1, 3}), (0.9, {1, 3, 2}), (0.99, {0, 1, 2, 3})]:
        kept = set(np.flatnonzero(np.isfinite(np.asarray(top_p_filter(logits, p)))).tolist())
        assert kept == nucleus, p
    assert set(np.flatnonzero(np.isfinite(np.asarray(top_k_filter(logits, 2)))).tolist()) == {1, 3}


def test_sampling_follows_the_filtered_distribution():
    logits = jnp.broadcast_to(jnp.log(jnp.array([0.05, 0.5, 0.15, 0.3], jnp.float32)), (20000, 4))
    draws = np.asarray(sample(logits, jax.random.key(0), 1.0, 0.75, greedy=False, top_k=0, use_top_p=True))
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=0.015)  # ~4 sigma at n=20000


def test_stop_tokens_stop(params):
    free = generate(params, CFG, PROMPTS, max_new_tokens=10, temperature=0)
    stop = free[1][4]
    out = generate(params, CFG, PROMPTS, max_new_tokens=10, temperature=0, stop_tokens=(stop,))
    for row, cut in zip(free, out):
        assert cut == (row[: row.index(stop)] if stop in row else row)


def test_seed_makes_sampling_reproducible(params):
    kwargs = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95}
    a = generate(params, CFG, PROMPTS, seed=1, **kwargs)
    assert a == generate(params, CFG, PROMPTS, seed=1, **kwargs)
    assert a != generate(params, CFG, PROMPTS, seed=2, **kwargs)


def test_one_compilation_per_bucket(params):
    generate(params, CFG, [[1, 2, 3]], max_new_tokens=5, temperature=0)
    size = _decode._cache_size()
    generate(params, CFG, [[9, 8, 7, 6, 5, 4, 3]], max_new_tokens=9, temperature=0)  # same buckets: 16, 32
    assert _decode._cache_size() == size


def test_generate_text_continues_the_prompt(params):
    tok = train_tokenizer(["the cat sat on the mat. " * 20, "a dog ran in the sun. " * 20], 280)
    prompts = PromptTokenizer(tok, SpecialTokens.defaults(tok))
    text = generate_text(params, CFG, prompts, "the cat", max_new_tokens=8, temperature=0)
    ids = generate(params, CFG, [tok.encode("the cat").ids], max_new_tokens=8, temperature=0,
                   stop_tokens=prompts.stop_ids)[0]
    assert text and tok.decode(tok.encode("the cat").ids + ids) == "the cat" + text
    cut = generate_text(params, CFG, prompts, "the cat", stop=["zzz", text[2:4]], max_new_tokens=8, temperature=0)
    assert cut == text[:text.find(text[2:4])]
    assert isinstance(generate_text(params, CFG, prompts, "", max_new_tokens=4, seed=3), str)


def test_stops_at_the_context_length(params):
    assert [len(o) for o in generate(params, CFG, [[1] * 250, [2]], max_new_tokens=9, temperature=0)] == [6, 6]


def test_rejects_requests_it_cannot_serve(params):
    with pytest.raises(UserError, match="max_seq_len"):
        generate(params, CFG, [[1] * CFG.max_seq_len], max_new_tokens=1)
    with pytest.raises(UserError, match="token ids"):
        generate(params, CFG, [[CFG.vocab_size]], max_new_tokens=1)
    with pytest.raises(UserError, match="prompt"):
        generate(params, CFG, [[]], max_new_tokens=1)

"""`anychip eval`: every token of the split scored once, in sliding windows, at a chosen length and dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anychip.config import Config, replace
from anychip.data.dataset import TokenDataset
from anychip.data.tokenizer import load_tokenizer, token_byte_lengths
from anychip.errors import UserError
from anychip.interop.hf import write_run
from anychip.model.decoder import forward
from anychip.model.params import init_params
from anychip.train.evaluate import evaluate, evaluate_run, score_split
from anychip.train.step import build_trainer


@pytest.fixture(scope="module")
def run(small_corpus, tmp_path_factory):
    """A tiny random model on the small corpus (scoring needs no training)."""
    cfg = replace(Config(), model="tiny", train={"seq_len": 64, "batch_size": 3}, data={"path": str(small_corpus)},
                  compute={"dtype": "float32"}, run_dir=str(tmp_path_factory.mktemp("eval") / "run"))
    params = init_params(cfg.model, jax.random.key(0))
    write_run(cfg, params, load_tokenizer(small_corpus / "tokenizer.json"), source="test")
    return cfg, params


@pytest.mark.parametrize("seq_len, stride", [(16, 16), (16, 5), (7, 1)])
def test_sliding_windows_score_every_target_once_after_seq_len_minus_stride_of_context(small_corpus, seq_len, stride):
    ds = TokenDataset(small_corpus, "val")
    scored, contexts = [], []
    for window, n_context in ds.sliding_windows(seq_len, stride):
        assert 2 <= len(window) <= seq_len + 1
        scored += window[1 + n_context:].tolist()
        contexts.append(n_context)
    assert scored == np.concatenate([s[1:] for s in ds.shards]).tolist()
    # The (one) shard's first window has no context before it; every later one seq_len - stride tokens.
    assert len(ds.shards) == 1 and contexts[0] == 0 and set(contexts[1:]) == {seq_len - stride}


def test_scores_every_token_and_matches_the_training_evaluator_and_a_window_by_window_forward(run, small_corpus):
    cfg, params = run
    ds, lengths = TokenDataset(small_corpus, "val"), token_byte_lengths(load_tokenizer(small_corpus / "tokenizer.json"))
    trainer = build_trainer(cfg)
    full = score_split(trainer, params, ds, 64, None, lengths, log=lambda _: None)
    assert full.tokens == sum(len(s) - 1 for s in ds.shards)  # no partial batch or window dropped
    assert full.tokens % (3 * 64) != 0  # ... and there was one to drop

    # Non-overlapping: the first full batch is what the training-time evaluator reads.
    ours = score_split(trainer, params, ds, 64, 1, lengths, log=lambda _: None)
    assert ours.loss == pytest.approx(evaluate(trainer, params, ds, 1, lengths).loss, abs=1e-5)

    # Overlapping: the first 6 windows through the plain forward pass and a log-softmax, then summed by hand.
    windows = [w for w, _ in zip(ds.sliding_windows(64, 24), range(6))]
    logits = forward(params, jnp.asarray(np.stack([w[:-1] for w, _ in windows])), cfg.model, compute_dtype=jnp.float32)
    logp = np.asarray(jax.nn.log_softmax(logits))  # (6, 64, V)
    nats = -sum(logp[i, np.arange(64), w[1:]][n_context:].sum() for i, (w, n_context) in enumerate(windows))
    n = sum(64 - n_context for _, n_context in windows)
    sliding = score_split(trainer, params, ds, 24, 2, lengths, log=lambda _: None)
    # fp32 sums of ~300 terms in another order: 1e-5 relative is ~10 ulps of headroom per term.
    assert (sliding.tokens, sliding.loss) == (n, pytest.approx(nats / n, rel=1e-5))


def test_evaluate_run_takes_length_stride_and_dtype(run):
    cfg, _ = run
    base = evaluate_run(cfg.run_dir, seq_len=32, max_batches=2, log=lambda _: None)
    bf16 = evaluate_run(cfg.run_dir, seq_len=32, max_batches=2, dtype="bfloat16", log=lambda _: None)
    assert base.tokens == bf16.tokens == 2 * 3 * 32
    assert base.loss != bf16.loss and bf16.loss == pytest.approx(base.loss, abs=0.05)  # bf16 rounding, not a bug
    with pytest.raises(UserError, match="max_seq_len"):
        evaluate_run(cfg.run_dir, seq_len=cfg.model.max_seq_len + 1)
    with pytest.raises(UserError, match="stride"):
        evaluate_run(cfg.run_dir, seq_len=32, stride=33)

"""Held-out evaluation: the loss, perplexity and bits per byte of a split, during training (`Evaluator`,
which decides when it runs) and of a finished run (`evaluate_run`, `anychip eval`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anychip.config import Config, replace
from anychip.data.dataset import TokenDataset
from anychip.data.tokenizer import token_byte_lengths, tokenizer_hash
from anychip.errors import UserError, require
from anychip.model.decoder import forward
from anychip.model.loss import log_normalizer_and_target
from anychip.parallel import mesh as sharding
from anychip.train.data import data_dir_for, open_datasets
from anychip.train.metrics import Discard, MetricsWriter
from anychip.train.run_dir import load_run
from anychip.train.step import Trainer, build_trainer, model_kwargs


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy, nats per token
    tokens: int
    perplexity: float
    bits_per_byte: float | None  # comparable across tokenizers; None without byte lengths

    def row(self, step: int) -> dict[str, Any]:
        """The metrics.jsonl row of this evaluation."""
        return {"step": step, "eval_loss": self.loss, "eval_tokens": self.tokens, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte}


def evaluate(trainer: Trainer, params: Any, ds: TokenDataset, max_batches: int | None,
             byte_lengths: np.ndarray | None = None) -> EvalResult:
    """Held-out cross-entropy over up to `max_batches` sequential batches of `ds`.

    With `byte_lengths` (UTF-8 bytes per token id) also bits per byte, which compares across tokenizers.
    """
    cfg = trainer.cfg.train
    nats, tokens, n_bytes = 0.0, 0, 0
    index, count = sharding.data_shard(trainer.mesh, cfg.batch_size)  # this process's rows of each batch
    for rows in ds.eval_batches(cfg.batch_size, cfg.seq_len, max_batches, index, count):
        batch = sharding.global_batch(rows, trainer.mesh, rows.shape[0] * count)
        n = batch.shape[0] * cfg.seq_len
        nats += float(trainer.eval_loss(params, batch)) * n
        tokens += n
        if byte_lengths is not None:
            n_bytes += int(byte_lengths[rows[:, 1:]].sum()) * count
    loss = nats / max(tokens, 1)
    bits = nats / math.log(2) / max(n_bytes, 1) if byte_lengths is not None else None
    return EvalResult(loss, tokens, math.exp(min(loss, 700.0)), bits)


def token_scorer(trainer: Trainer) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """Jitted (params, tokens (B, T+1)) → (log-probability of each next token (B, T) fp32, whether it was the
    argmax (B, T)), in the trainer's compute dtype and mesh: `anychip eval` and the lm-eval adapter."""
    cfg = trainer.cfg

    def score(params: Any, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = forward(params, tokens[:, :-1], cfg.model, **model_kwargs(cfg))  # (B, T, V) fp32
        lse, target = log_normalizer_and_target(logits, tokens[:, 1:])
        return target - lse, jnp.argmax(logits, axis=-1) == tokens[:, 1:]

    p_shard = trainer.state_shardings.params
    return jax.jit(sharding.with_activation_sharding(score, trainer.mesh),
                   in_shardings=(p_shard, sharding.batch_sharding(trainer.mesh)))


def _window_batches(ds: TokenDataset, seq_len: int, stride: int, batch_size: int):
    """(tokens (B, seq_len+1), scored (B, seq_len) bool) batches of `ds.sliding_windows`; the last one is
    padded with rows that score nothing, so every token counts and no batch is dropped."""
    tokens, scored = np.zeros((batch_size, seq_len + 1), np.int32), np.zeros((batch_size, seq_len), bool)
    row = 0
    for window, n_context in ds.sliding_windows(seq_len, stride):
        tokens[row, :len(window)], scored[row, n_context:len(window) - 1] = window, True
        row += 1
        if row == batch_size:
            yield tokens, scored
            tokens, scored, row = np.zeros_like(tokens), np.zeros_like(scored), 0
    if row:
        yield tokens, scored


def score_split(trainer: Trainer, params: Any, ds: TokenDataset, stride: int, max_batches: int | None,
                byte_lengths: np.ndarray, log: Callable[[str], None] = print) -> EvalResult:
    """Loss, perplexity and bits per byte over every token of `ds` (or its first `max_batches` batches),
    in sliding windows of train.seq_len tokens every `stride` tokens."""
    t = trainer.cfg.train
    score, nats, n_tokens, n_bytes = token_scorer(trainer), 0.0, 0, 0
    start = last_log = time.perf_counter()
    for i, (tokens, scored) in enumerate(_window_batches(ds, t.seq_len, stride, t.batch_size)):
        if max_batches is not None and i == max_batches:
            break
        logprobs = np.asarray(score(params, tokens)[0])
        nats -= float(logprobs[scored].sum())
        n_tokens += int(scored.sum())
        n_bytes += int(byte_lengths[tokens[:, 1:][scored]].sum())
        if time.perf_counter() - last_log > 10:  # long evaluations show progress
            last_log = time.perf_counter()
            log(f"eval: {n_tokens:,} of {ds.n_tokens:,} tokens, {n_tokens / (last_log - start):,.0f} tokens/s")
    loss = nats / max(n_tokens, 1)
    return EvalResult(loss, n_tokens, math.exp(min(loss, 700.0)), nats / math.log(2) / max(n_bytes, 1))


def evaluate_run(run_dir: str | Path, data: str | None = None, max_batches: int | None = None, *,
                 seq_len: int | None = None, stride: int | None = None, dtype: str = "float32",
                 batch_size: int | None = None, log: Callable[[str], None] = print) -> EvalResult:
    """`anychip eval`: held-out loss, perplexity and bits per byte of a run's newest checkpoint over every
    token of the split, in windows of `seq_len` (default train.seq_len, at most model.max_seq_len) tokens
    starting every `stride` (default seq_len) tokens, computed in `dtype`."""
    require(max_batches is None or max_batches >= 1, f"max_batches must be at least 1, got {max_batches}")
    cfg, params, tokenizer = load_run(run_dir)
    seq_len = seq_len or cfg.train.seq_len
    cfg = replace(cfg, train={"seq_len": seq_len, "batch_size": batch_size or cfg.train.batch_size, "grad_accum": 1},
                  compute={"dtype": dtype}, **({"data": {"path": data}} if data is not None else {}))
    _, val_ds = open_datasets(cfg, data_dir_for(cfg))
    if val_ds.manifest["tokenizer_sha256"] != tokenizer_hash(tokenizer):
        raise UserError(f"{val_ds.data_dir} was tokenized with a different tokenizer than the run {run_dir}")
    return score_split(build_trainer(cfg), params, val_ds, stride or seq_len, max_batches,
                       token_byte_lengths(tokenizer), log)


class Evaluator:
    """Evaluates the held-out split every `eval.every` steps of a run, writes the row and logs a line."""

    def __init__(self, trainer: Trainer, ds: TokenDataset, byte_lengths: np.ndarray,
                 writer: MetricsWriter | Discard, log: Callable[[str], None]):
        self.trainer, self.ds, self.byte_lengths, self.writer, self.log = trainer, ds, byte_lengths, writer, log
        self.cfg: Config = trainer.cfg

    def maybe_evaluate(self, step: int, params: Any) -> EvalResult | None:
        """Evaluate at every multiple of eval.every before the last step (the end evaluates in `finish`)."""
        if step % self.cfg.eval.every or step >= self.cfg.train.steps:
            return None
        return self.evaluate(step, params)

    def evaluate(self, step: int, params: Any, write: bool = True) -> EvalResult:
        result = evaluate(self.trainer, params, self.ds, self.cfg.eval.batches, self.byte_lengths)
        if write:
            self.writer.write(result.row(step))
        self.log(f"step {step}: held-out loss {result.loss:.4f} ({result.bits_per_byte:.3f} bits/byte)")
        return result

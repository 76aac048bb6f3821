"""Held-out evaluation: the loss, perplexity and bits per byte of a split, during training (`Evaluator`,
which decides when it runs) and of a finished run (`evaluate_run`, `anychip eval`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anychip.config import Config, replace
from anychip.data.dataset import TokenDataset
from anychip.data.tokenizer import token_byte_lengths, tokenizer_hash
from anychip.errors import UserError, require
from anychip.parallel import mesh as sharding
from anychip.train.data import data_dir_for, open_datasets
from anychip.train.metrics import Discard, MetricsWriter
from anychip.train.run_dir import load_run
from anychip.train.step import Trainer, build_trainer


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


def evaluate_run(run_dir: str | Path, data: str | None = None, max_batches: int | None = None) -> EvalResult:
    """`anychip eval`: held-out loss, perplexity and bits per byte of a run's newest checkpoint."""
    require(max_batches is None or max_batches >= 1, f"max_batches must be at least 1, got {max_batches}")
    cfg, params, tokenizer = load_run(run_dir)
    if data is not None:
        cfg = replace(cfg, data={"path": data})
    _, val_ds = open_datasets(cfg, data_dir_for(cfg))
    if val_ds.manifest["tokenizer_sha256"] != tokenizer_hash(tokenizer):
        raise UserError(f"{val_ds.data_dir} was tokenized with a different tokenizer than the run {run_dir}")
    return evaluate(build_trainer(cfg), params, val_ds, max_batches, token_byte_lengths(tokenizer))


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

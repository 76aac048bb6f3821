"""The data a run trains and evaluates on: its prepared data dir (or the built-in corpus), opened and
checked against the model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from anychip.config import Config
from anychip.data.dataset import TokenDataset
from anychip.data.prepare import builtin_corpus
from anychip.errors import UserError


def data_dir_for(cfg: Config, log: Callable[[str], None] = print) -> Path:
    """`data.path`, or the built-in corpus prepared once into `data.cache_dir`."""
    if cfg.data.path is not None:
        return Path(cfg.data.path)
    return builtin_corpus(cfg.data.cache_dir, vocab_size=min(cfg.model.vocab_size, 8192), log=log)


def open_datasets(cfg: Config, data_dir: Path) -> tuple[TokenDataset, TokenDataset]:
    """The train and val splits; the model's vocabulary must hold every token id of the tokenizer."""
    train_ds = TokenDataset(data_dir, "train", verify=cfg.data.verify_checksums)
    val_ds = TokenDataset(data_dir, "val", verify=cfg.data.verify_checksums)
    if train_ds.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"the tokenizer of {data_dir} has {train_ds.vocab_size} tokens but model.vocab_size is "
            f"{cfg.model.vocab_size}; set model.vocab_size={train_ds.vocab_size} or prepare the data with a "
            "smaller vocabulary"
        )
    return train_ds, val_ds

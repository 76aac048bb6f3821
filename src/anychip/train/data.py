"""The data a run trains and evaluates on: its prepared data dir (or the built-in corpus), opened and
checked against the model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from anychip import storage
from anychip.config import Config, replace
from anychip.data.dataset import TokenDataset
from anychip.data.mixture import MixtureDataset, parse_mixture
from anychip.data.prepare import builtin_corpus
from anychip.data.tokenizer import eot_id, load_tokenizer, tokenizer_hash
from anychip.errors import UserError


def data_dir_for(cfg: Config, log: Callable[[str], None] = print) -> str | Path:
    """`data.path` (a local path or URL), or the built-in corpus prepared once into `data.cache_dir`."""
    if cfg.data.mixture is not None:
        return cfg.data.mixture
    if cfg.data.path is not None:
        storage.check_reachable(cfg.data.path)
        return cfg.data.path if storage.is_remote(cfg.data.path) else Path(cfg.data.path)
    return builtin_corpus(cfg.data.cache_dir, vocab_size=min(cfg.model.vocab_size, 8192), log=log)


def open_datasets(cfg: Config, data_dir: str | Path) -> tuple[Any, Any]:
    """The train and val splits (TokenDataset, or MixtureDataset with data.mixture); the model's vocabulary must hold every token id of the tokenizer.

    The vocabulary is the tokenizer's own, checked against the manifest's tokenizer hash, never the
    manifest's vocab_size (a text field anyone can edit): a too-small embedding table would turn the
    ids beyond it into NaN losses."""
    cache, verify = cfg.data.stream_cache_mb << 20, cfg.data.verify_checksums
    if cfg.data.mixture is not None:
        entries = parse_mixture(cfg.data.mixture)
        for entry in entries:
            storage.check_reachable(entry["path"])
        train_ds: Any = MixtureDataset(entries, "train", verify, cache)
        val_ds: Any = MixtureDataset(entries, "val", verify, cache)
    else:
        train_ds, val_ds = TokenDataset(data_dir, "train", verify, cache), TokenDataset(data_dir, "val", verify, cache)
    tokenizer = load_tokenizer(train_ds.tokenizer_path)
    if tokenizer_hash(tokenizer) != train_ds.manifest["tokenizer_sha256"]:
        raise UserError(f"{train_ds.tokenizer_path} is not the tokenizer {data_dir} was prepared with "
                        "(its hash differs from manifest.json's); re-run anychip data prepare")
    vocab_size = tokenizer.get_vocab_size()
    if vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"the tokenizer of {data_dir} has {vocab_size} tokens but model.vocab_size is "
            f"{cfg.model.vocab_size}; set model.vocab_size={vocab_size} or prepare the data with a "
            "smaller vocabulary"
        )
    return train_ds, val_ds


def with_eot_id(cfg: Config, train_ds: TokenDataset) -> Config:
    """`train.document_mask` without an eot_id: the data's tokenizer's end-of-text token (documents end there)."""
    if not cfg.train.document_mask or cfg.train.eot_id is not None:
        return cfg
    return replace(cfg, train={"eot_id": eot_id(load_tokenizer(train_ds.tokenizer_path))})

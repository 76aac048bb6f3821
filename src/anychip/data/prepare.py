"""Corpora → token shards, tokenizer.json and manifest.json: the data dir `dataset.py` reads.

Inputs are files, folders (recursive) and globs: `.jsonl` (one document per line), `.parquet` (one per
row), anything else one UTF-8 document per file. A tokenizer is trained on the corpus unless one is
given; every document is followed by the end-of-text token; a share of documents, chosen by content
hash, is held out. The data dir is built in a hidden sibling and renamed at the end, so it appears
complete or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from glob import glob
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from anychip.data.dataset import FORMAT, SPLITS, VERSION
from anychip.data.tokenizer import eot_id, load_tokenizer, save_tokenizer, tokenizer_hash, train_tokenizer
from anychip.errors import UserError, require
from anychip.files import atomic_directory, check_new_directory

# Text per encode_batch call: many documents so every core has work, few enough that the Encoding
# objects (~100 bytes per token, with their token strings) stay small.
CHUNK_CHARS = 4_000_000
PROGRESS_EVERY_S = 10.0
# `encodings` is left out too: its charmap tables ("LATIN SMALL LETTER O WITH TILDE" × thousands)
# are a tenth of the corpus, easy to memorise, and would dominate a small model's samples.
BUILTIN_EXCLUDED = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "encodings"})


# ---------------------------------------------------------------------------------------------
# Finding files and reading documents


def _walk(folder: Path, skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Files under `folder` in a stable order. Hidden entries (.git, .venv, .DS_Store) are tooling, not text."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in skip_dirs)
        files += [Path(root, n) for n in sorted(names) if not n.startswith(".")]
    return files


def _expand(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return _walk(path)
    matches = sorted(glob(str(path), recursive=True)) if set("*?[") & set(spec) else []
    require(bool(matches), f"input not found: {spec}")
    return [f for match in matches for f in _expand(match)]


def find_files(inputs: list[str]) -> list[Path]:
    """The files named by `inputs` (files, folders searched recursively, globs), each once, in a stable order."""
    return list(dict.fromkeys(f for spec in inputs for f in _expand(spec)))


def stdlib_sources(root: str | Path) -> list[Path]:
    """The `.py` files of a standard library tree, without installed packages, test suites and IDLE."""
    return [p for p in _walk(Path(root), BUILTIN_EXCLUDED) if p.suffix == ".py"]


def _file_texts(path: Path, skipped: Counter[str]) -> list[str]:
    try:
        return [path.read_bytes().decode("utf-8")]
    except OSError:
        skipped["unreadable_files"] += 1
    except UnicodeDecodeError:
        skipped["non_utf8_files"] += 1
    return []


def _jsonl_texts(path: Path, field: str, skipped: Counter[str]) -> Iterator[str]:
    try:
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue  # a blank line is no record
                try:
                    record = json.loads(line)
                except ValueError:  # not JSON, or not UTF-8
                    skipped["invalid_json_lines"] += 1
                    continue
                text = record.get(field) if isinstance(record, dict) else None
                if isinstance(text, str):
                    yield text
                else:
                    skipped["records_without_text"] += 1
    except OSError:
        skipped["unreadable_files"] += 1


def _parquet_texts(path: Path, column: str, skipped: Counter[str]) -> Iterator[str]:
    try:
        parquet = pq.ParquetFile(path)
        if column not in parquet.schema_arrow.names:
            skipped["records_without_text"] += parquet.metadata.num_rows
            return
        # Record batches keep memory flat however large the file is.
        for batch in parquet.iter_batches(batch_size=1024, columns=[column]):
            for text in batch.column(0).to_pylist():
                if text is None or isinstance(text, str):
                    yield text or ""
                else:
                    skipped["records_without_text"] += 1
    except (OSError, pa.ArrowException):
        skipped["unreadable_files"] += 1


def read_documents(files: list[Path], skipped: Counter[str], text_field: str = "text",
                   parquet_column: str = "text") -> Iterator[str]:
    """Every non-empty document of `files`; what is left out is counted in `skipped`, by reason.

    `.jsonl`: one document per line (its `text_field`); `.parquet`: one per row of `parquet_column`;
    any other file is one UTF-8 document.
    """
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            texts: Iterable[str] = _jsonl_texts(path, text_field, skipped)
        elif suffix == ".parquet":
            texts = _parquet_texts(path, parquet_column, skipped)
        else:
            texts = _file_texts(path, skipped)
        for text in texts:
            if text.strip():
                yield text
            else:
                skipped["empty_documents"] += 1


def assign_val(hashes: np.ndarray, val_fraction: float) -> np.ndarray:
    """(n_docs,) bool: which documents are held out for validation.

    Chosen by content hash, so the split does not depend on paths or file order and copies of a
    document land in the same split. At least one document goes to each split.
    """
    is_val = hashes < val_fraction * 2**32
    if not is_val.any():
        is_val[np.argmin(hashes)] = True
    if is_val.all():
        is_val[np.argmax(hashes)] = False
    return is_val


# ---------------------------------------------------------------------------------------------
# Writing shards


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the disk and page cache of uint32), else uint32; little-endian."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


class _ShardWriter:
    """Appends one split's documents to `<split>_00000.bin`, `<split>_00001.bin`, ...

    A shard is closed before a document that would overflow it, so a document never spans two shards
    (a single document longer than `shard_tokens` gets a shard of its own).
    """

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = self.bytes = 0
        self._file: Any = None

    def add(self, tokens: np.ndarray, n_bytes: int) -> None:
        if self._file is not None and self._current["tokens"] + len(tokens) > self.shard_tokens:
            self._close_shard()
        if self._file is None:
            name = f"{self.split}_{len(self.shards):05d}.bin"
            # Kept open across add() calls so a shard streams to disk; _close_shard closes it.
            self._file, self._hasher = open(self.out_dir / name, "xb"), hashlib.sha256()  # noqa: SIM115
            self._current = {"file": name, "tokens": 0, "documents": 0}
        data = tokens.tobytes()
        self._file.write(data)
        self._hasher.update(data)
        self._current["tokens"] += len(tokens)
        self._current["documents"] += 1
        self.documents += 1
        self.bytes += n_bytes

    def _close_shard(self) -> None:
        self._file.close()
        self._file = None
        self.shards.append({**self._current, "sha256": self._hasher.hexdigest()})

    def finish(self) -> dict[str, Any]:
        if self._file is not None:
            self._close_shard()
        tokens = sum(s["tokens"] for s in self.shards)
        return {"tokens": tokens, "documents": self.documents, "bytes": self.bytes, "shards": self.shards}


def _progress(texts: Iterable[str], doing: str, log: Callable[[str], None]) -> Iterator[str]:
    """`texts`, with a line every PROGRESS_EVERY_S seconds saying how far the pass is."""
    start = last = time.perf_counter()
    n = chars = 0
    for text in texts:
        yield text
        n, chars = n + 1, chars + len(text)
        if time.perf_counter() - last >= PROGRESS_EVERY_S:
            last = time.perf_counter()
            log(f"{doing} {n:,} documents, {chars / 1e6:,.0f}M characters ({chars / 1e6 / (last - start):,.1f}M/s)")


def _chunks(texts: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _write_shards(tok: Tokenizer, docs: Iterable[str], hashes: np.ndarray, is_val: np.ndarray, out_dir: Path,
                  shard_tokens: int, log: Callable[[str], None]) -> dict[str, Any]:
    dtype, eot = token_dtype(tok.get_vocab_size()), eot_id(tok)
    writers = {split: _ShardWriter(out_dir, split, shard_tokens) for split in SPLITS}
    index, n_tokens, start = 0, 0, time.perf_counter()
    last_log = start
    for chunk in _chunks(docs, CHUNK_CHARS):
        # encode_batch_fast tokenizes the documents in parallel on all cores (Rust threads, no GIL);
        # "fast" skips the character offsets, which we do not need.
        for text, encoding in zip(chunk, tok.encode_batch_fast(chunk)):
            raw = text.encode("utf-8")
            # The split was chosen from the first read; a file edited since then would shift it.
            require(index < len(hashes) and zlib.crc32(raw) == hashes[index],
                     "the input files changed while they were being prepared; run again")
            tokens = np.empty(len(encoding.ids) + 1, dtype)
            tokens[:-1], tokens[-1] = encoding.ids, eot
            writers["val" if is_val[index] else "train"].add(tokens, len(raw))
            index, n_tokens = index + 1, n_tokens + len(tokens)
        if time.perf_counter() - last_log >= PROGRESS_EVERY_S:
            last_log = time.perf_counter()
            log(f"tokenized {index:,}/{len(hashes):,} documents ({index / (last_log - start):,.0f} docs/s), "
                f"{n_tokens:,} tokens")
    require(index == len(hashes), "the input files changed while they were being prepared; run again")
    return {split: w.finish() for split, w in writers.items()}


# ---------------------------------------------------------------------------------------------
# prepare


def _describe(inputs: list[str]) -> str:
    shown = ", ".join(inputs[:3])
    return shown + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")


def _skip_summary(skipped: Counter[str]) -> str:
    return ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in sorted(skipped.items())) or "nothing"


def prepare(inputs: list[str], out_dir: str | Path, *, vocab_size: int = 8192, tokenizer: str | None = None,
            val_fraction: float = 0.01, text_field: str = "text", parquet_column: str = "text",
            shard_tokens: int = 50_000_000, log: Callable[[str], None] = print) -> dict:
    """Tokenize files, folders and globs into token shards, tokenizer.json and manifest.json in `out_dir`.

    Uses the tokenizer.json at `tokenizer` if given, else trains a byte-level BPE of `vocab_size` on
    the corpus. Everything is written into a temp dir next to `out_dir`, renamed at the end.
    Returns the manifest.
    """
    out_dir = Path(out_dir).expanduser()
    check_new_directory(out_dir)
    require(0 <= val_fraction < 1, f"val_fraction must be in [0, 1), got {val_fraction}")
    require(shard_tokens > 0, f"shard_tokens must be positive, got {shard_tokens}")
    tok = load_tokenizer(tokenizer) if tokenizer else None
    if tok is not None:
        eot_id(tok)  # fail now, not after reading the whole corpus
    with atomic_directory(out_dir) as tmp:  # removed on an error, Ctrl-C or SIGTERM
        return _prepare_into(tmp, inputs, tok, vocab_size, val_fraction, text_field, parquet_column,
                             shard_tokens, log)


def _prepare_into(tmp: Path, inputs: list[str], tok: Tokenizer | None, vocab_size: int, val_fraction: float,
                  text_field: str, parquet_column: str, shard_tokens: int, log: Callable[[str], None]) -> dict:
    start = time.perf_counter()
    files = find_files(inputs)
    skipped: Counter[str] = Counter()

    def docs(counter: Counter[str]) -> Iterator[str]:
        return read_documents(files, counter, text_field, parquet_column)

    # First pass: count and hash documents, so empty or one-document corpora fail before any slow work.
    hashes = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in _progress(docs(skipped), "read", log)),
                         dtype=np.uint32)
    log(f"read {len(files):,} files: {len(hashes):,} documents; skipped {_skip_summary(skipped)}")
    require(len(hashes) > 0, f"no text found in {_describe(inputs)} (skipped {_skip_summary(skipped)})")
    require(len(hashes) >= 2, f"only one document in {_describe(inputs)}; need at least 2 (train and val)")
    if tok is None:
        log(f"training a {vocab_size:,}-token byte-level BPE tokenizer")
        tok = train_tokenizer(_progress(docs(Counter()), "tokenizer training read", log), vocab_size)
    save_tokenizer(tok, tmp / "tokenizer.json")
    splits = _write_shards(tok, docs(Counter()), hashes, assign_val(hashes, val_fraction), tmp, shard_tokens, log)
    manifest = {
        "format": FORMAT, "version": VERSION, "dtype": token_dtype(tok.get_vocab_size()).name,
        "vocab_size": tok.get_vocab_size(), "eot_id": eot_id(tok), "tokenizer": "tokenizer.json",
        "tokenizer_sha256": tokenizer_hash(tok), "val_fraction": val_fraction,
        "total_tokens": sum(s["tokens"] for s in splits.values()), "splits": splits,
        "sources": {"files": len(files), "documents": len(hashes), "skipped": dict(sorted(skipped.items()))},
    }
    with open(tmp / "manifest.json", "x", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    log(f"tokenized {len(hashes):,} documents into {manifest['total_tokens']:,} tokens "
        f"in {time.perf_counter() - start:.1f}s")
    return manifest


def builtin_corpus(cache_dir: str | Path, vocab_size: int = 8192, log: Callable[[str], None] = print) -> Path:
    """The default corpus: this Python's standard library sources, prepared once into `cache_dir`.

    Python 3.11: 674 files, 11 MB, 3.0M tokens at vocab 8192, prepared in ~13 s on 2 CPU cores. That
    is fast enough to train the tokenizer on all of it (~4 s; a subset is no faster, since the merge
    loop, not the word count, dominates).
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    out_dir = Path(cache_dir).expanduser() / f"stdlib-py{version}-v{vocab_size}"
    if not (out_dir / "manifest.json").is_file():
        root = sysconfig.get_paths()["stdlib"]
        log(f"preparing the built-in corpus (Python {version} standard library at {root}) into {out_dir}")
        try:
            prepare([str(p) for p in stdlib_sources(root)], out_dir, vocab_size=vocab_size, log=log)
        except UserError:
            if not (out_dir / "manifest.json").is_file():  # else another process prepared it meanwhile
                raise
    return out_dir

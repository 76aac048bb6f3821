"""Corpora → token shards, tokenizer.json and manifest.json: the data dir `dataset.py` reads.

Inputs are files, folders (recursive), globs and URLs (data/sources.py). A tokenizer is trained on a
bounded sample of the corpus unless one is given; every document is followed by the end-of-text token;
a share of documents, chosen by content hash, is held out.

The work is split into tasks of consecutive input files (TASK_BYTES), run by an engine (data/engines.py: in this process or
on Ray), in two passes: *scan* (count and hash each file's documents, so the held-out split is known
before any tokenizing) and *tokenize* (each task writes its own shards straight to the output). Every
task leaves a record in OUT/.prepare/; a re-run with the same inputs and settings skips the tasks
whose record exists, so a killed preparation resumes. The manifest is assembled from the records in
file order, so the output does not depend on the engine or on which tasks ran when.

A local data dir is built in a hidden sibling and renamed at the end; in an object store (no rename)
it is built in place and is complete once manifest.json exists, which is written last.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import sys
import sysconfig
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from anychip import storage
from anychip.data.dataset import FORMAT, SPLITS, VERSION
from anychip.data.engines import Job, Progress, check_engine, run_tasks
from anychip.data.sources import find_files, read_documents
from anychip.data.sources import stdlib_sources as _stdlib_sources
from anychip.data.tokenizer import eot_id, load_tokenizer, save_tokenizer, tokenizer_hash, train_tokenizer
from anychip.errors import UserError, require
from anychip.files import atomic_directory, check_new_directory
from anychip.storage import open_output

# Text per encode_batch call: many documents so every core has work, few enough that the Encoding
# objects (~100 bytes per token, with their token strings) stay small.
CHUNK_CHARS = 4_000_000
PROGRESS_EVERY_S = 10.0
# The tokenizer trains on at most this many characters, taken evenly from every file: its memory is the
# word counts of the sample, not of the corpus.
TOKENIZER_SAMPLE_CHARS = 2_000_000_000
# `encodings` is left out too: its charmap tables ("LATIN SMALL LETTER O WITH TILDE" × thousands)
# are a tenth of the corpus, easy to memorise, and would dominate a small model's samples.
BUILTIN_EXCLUDED = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "encodings"})
# Input bytes per task: consecutive files are grouped up to this (a big file is a task of its own), so a
# corpus of many small files still gives shards of a useful size and few records.
TASK_BYTES = 256 << 20
STATE = ".prepare"  # the tasks' records, inside the output while it is being built

__all__ = ["assign_val", "builtin_corpus", "find_files", "prepare", "read_documents", "stdlib_sources",
           "token_dtype"]


def stdlib_sources(root: str | Path) -> list[Path]:
    """The `.py` files of a standard library tree, without installed packages, test suites and IDLE."""
    return _stdlib_sources(root, BUILTIN_EXCLUDED)


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
    """Appends one task's documents of a split to `<split>_<task>_00000.bin`, `<split>_<task>_00001.bin`, ...

    A shard is closed before a document that would overflow it, so a document never spans two shards
    (a single document longer than `shard_tokens` gets a shard of its own).
    """

    def __init__(self, out_dir: str, split: str, task: int, shard_tokens: int):
        self.out_dir, self.split, self.task, self.shard_tokens = out_dir, split, task, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = self.bytes = 0
        self._file: Any = None

    def add(self, tokens: np.ndarray, n_bytes: int) -> None:
        if self._file is not None and self._current["tokens"] + len(tokens) > self.shard_tokens:
            self._close_shard()
        if self._file is None:
            name = f"{self.split}_{self.task:05d}_{len(self.shards):05d}.bin"
            # Kept open across add() calls so a shard streams out; an object store makes it visible on
            # close, whole. A task killed mid-shard rewrites it on resume ("wb").
            self._file, self._hasher = open_output(storage.join(self.out_dir, name)), hashlib.sha256()
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


# ---------------------------------------------------------------------------------------------
# The two tasks: plain functions of a JSON-able job, run by either engine


def _record_path(root: str, kind: str, index: int) -> str:
    return storage.join(root, STATE, f"{kind}_{index:05d}.json")


def _cached(fn: Callable[[Job], dict[str, Any]]) -> Callable[[Job], dict[str, Any]]:
    """Run a task unless its record exists (a resumed preparation); write the record last."""
    def task(job: Job) -> dict[str, Any]:
        path = _record_path(job["root"], fn.__name__.strip("_"), job["index"])
        if storage.exists(path):
            return json.loads(storage.read_text(path))
        text = json.dumps(fn(job), sort_keys=True)
        storage.write_text(path, text)
        return json.loads(text)  # as a resumed run reads it back: the manifest's key order is the same
    task.__name__ = task.__qualname__ = fn.__name__ + "_task"
    return task


def _docs(job: Job, skipped: Counter[str]) -> Iterator[str]:
    return read_documents(job["files"], skipped, job["text_field"], job["parquet_column"])


def _group(files: list[str], task_bytes: int) -> list[list[str]]:
    """Consecutive files, grouped while their total size stays within `task_bytes`."""
    groups: list[list[str]] = []
    total = task_bytes
    for path in files:
        size = storage.size(path)
        if total + size > task_bytes:
            groups.append([])
            total = 0
        groups[-1].append(path)
        total += size
    return groups


def _scan(job: Job) -> dict[str, Any]:
    """Count and hash one task's documents (crc32 of the UTF-8 text: the key of the held-out split)."""
    skipped: Counter[str] = Counter()
    hashes = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in _docs(job, skipped)), dtype="<u4")
    return {"hashes": base64.b64encode(hashes.tobytes()).decode(), "skipped": dict(sorted(skipped.items()))}


@functools.lru_cache(maxsize=1)
def _task_tokenizer(tokenizer_json: str) -> Tokenizer:
    """The tokenizer of a task, parsed once per process (a Ray worker runs many tasks of one preparation)."""
    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True  # as load_tokenizer: literal "<|endoftext|>" is text
    return tok


def _tokenize(job: Job) -> dict[str, Any]:
    """Tokenize one task's files into its own shards of each split."""
    tok = _task_tokenizer(job["tokenizer_json"])
    hashes = np.frombuffer(base64.b64decode(job["hashes"]), dtype="<u4")
    is_val = np.frombuffer(base64.b64decode(job["is_val"]), dtype=bool)
    dtype, eot = token_dtype(tok.get_vocab_size()), eot_id(tok)
    writers = {split: _ShardWriter(job["root"], split, job["index"], job["shard_tokens"]) for split in SPLITS}
    index = 0
    for chunk in _chunks(_docs(job, Counter()), CHUNK_CHARS):
        # encode_batch_fast tokenizes the documents in parallel on all cores (Rust threads, no GIL);
        # "fast" skips the character offsets, which we do not need.
        for text, encoding in zip(chunk, tok.encode_batch_fast(chunk)):
            raw = text.encode("utf-8")
            # The split was chosen from the scan; a file edited since then would shift it.
            require(index < len(hashes) and zlib.crc32(raw) == hashes[index],
                     f"{_describe(job['files'])} changed while being prepared; run again")
            tokens = np.empty(len(encoding.ids) + 1, dtype)
            tokens[:-1], tokens[-1] = encoding.ids, eot
            writers["val" if is_val[index] else "train"].add(tokens, len(raw))
            index += 1
    require(index == len(hashes), f"{_describe(job['files'])} changed while being prepared; run again")
    splits = {split: w.finish() for split, w in writers.items()}
    return {"splits": splits, "tokens": sum(s["tokens"] for s in splits.values())}


_scan_task, _tokenize_task = _cached(_scan), _cached(_tokenize)


# ---------------------------------------------------------------------------------------------
# prepare


def _describe(inputs: list[str]) -> str:
    shown = ", ".join(inputs[:3])
    return shown + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")


def _skip_summary(skipped: Counter[str]) -> str:
    return ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in sorted(skipped.items())) or "nothing"


def prepare(inputs: list[str], out_dir: str | Path, *, vocab_size: int = 8192, tokenizer: str | None = None,
            val_fraction: float = 0.01, text_field: str = "text", parquet_column: str = "text",
            shard_tokens: int = 50_000_000, engine: str = "local", ray_address: str | None = None,
            log: Callable[[str], None] = print) -> dict:
    """Tokenize files, folders, globs and URLs into token shards, tokenizer.json and manifest.json in `out_dir`
    (a local path or a URL).

    Uses the tokenizer.json at `tokenizer` if given, else trains a byte-level BPE of `vocab_size` on
    the corpus. `engine`: "local" (this process, all cores) or "ray" (`ray_address`, else a local
    Ray started here). Returns the manifest.
    """
    require(0 <= val_fraction < 1, f"val_fraction must be in [0, 1), got {val_fraction}")
    require(shard_tokens > 0, f"shard_tokens must be positive, got {shard_tokens}")
    check_engine(engine)
    for path in [*inputs, str(out_dir), *([tokenizer] if tokenizer else [])]:
        storage.check_reachable(path)  # unknown scheme, credentials, endpoint: now, before any work
    tok = load_tokenizer(tokenizer) if tokenizer else None
    if tok is not None:
        eot_id(tok)  # fail now, not after reading the whole corpus
    settings = {"inputs": list(inputs), "vocab_size": vocab_size, "val_fraction": val_fraction,
                "text_field": text_field, "parquet_column": parquet_column, "shard_tokens": shard_tokens,
                "tokenizer": None if tok is None else tokenizer_hash(tok)}
    run = {"tok": tok, "settings": settings, "engine": engine, "ray_address": ray_address, "log": log}
    if not storage.is_remote(out_dir):
        out = storage.local_path(out_dir)
        check_new_directory(out)
        with atomic_directory(out) as tmp:  # removed on an error, Ctrl-C or SIGTERM
            manifest = _prepare_into(str(tmp), **run)
            storage.remove_tree(tmp / STATE)
            return manifest
    _check_remote_out(str(out_dir), settings)
    manifest = _prepare_into(str(out_dir), **run)
    storage.remove_tree(storage.join(out_dir, STATE))  # after the manifest: a kill in between loses nothing
    return manifest


def _check_remote_out(out: str, settings: dict[str, Any]) -> None:
    """An object-store output is new, or holds an unfinished preparation with the same settings (resumed)."""
    names = storage.listdir(out)
    if "manifest.json" in names or (names and STATE not in names):
        raise UserError(f"{out} already exists and is not empty; choose a new --out (nothing was changed)")
    plan = storage.join(out, STATE, "plan.json")
    if storage.exists(plan):
        if json.loads(storage.read_text(plan)) != settings:
            raise UserError(f"{out} holds an unfinished preparation of other inputs or settings; "
                            "choose a new --out or remove it")
    else:
        storage.write_text(plan, json.dumps(settings, sort_keys=True))


def _train_sample(files: list[str], settings: dict[str, Any]) -> Iterator[str]:
    """At most TOKENIZER_SAMPLE_CHARS characters of documents, an equal budget from the start of every file."""
    budget = max(1, TOKENIZER_SAMPLE_CHARS // len(files))
    for path in files:
        taken = 0
        for text in read_documents([path], Counter(), settings["text_field"], settings["parquet_column"]):
            yield text
            taken += len(text)
            if taken >= budget:
                break


def _tokenizer_for(root: str, files: list[str], tok: Tokenizer | None, settings: dict[str, Any],
                   log: Callable[[str], None]) -> Tokenizer:
    """The given tokenizer, the one an interrupted run of this preparation trained, or a new one."""
    path = storage.join(root, "tokenizer.json")
    if storage.exists(path):
        trained = Tokenizer.from_str(storage.read_text(path))
        trained.encode_special_tokens = True
        return trained
    if tok is None:
        log(f"training a {settings['vocab_size']:,}-token byte-level BPE tokenizer")
        tok = train_tokenizer(_progress(_train_sample(files, settings), "tokenizer training read", log),
                              settings["vocab_size"])
    if storage.is_remote(path):
        storage.write_text(path, tok.to_str(pretty=True))
    else:
        save_tokenizer(tok, path)
    return tok


def _prepare_into(root: str, tok: Tokenizer | None, settings: dict[str, Any], engine: str,
                  ray_address: str | None, log: Callable[[str], None]) -> dict:
    start = time.perf_counter()
    inputs = settings["inputs"]
    files = find_files(inputs)
    base = {"root": root, "text_field": settings["text_field"], "parquet_column": settings["parquet_column"]}
    jobs = [{**base, "index": i, "files": group} for i, group in enumerate(_group(files, TASK_BYTES))]
    # Scan first: empty or one-document corpora fail before any slow work.
    scans = run_tasks(_scan_task, jobs, engine, ray_address, Progress(len(jobs), "scanned", log))
    per_file = [np.frombuffer(base64.b64decode(s["hashes"]), dtype="<u4") for s in scans]
    hashes = np.concatenate(per_file)
    skipped = sum((Counter(s["skipped"]) for s in scans), Counter())
    log(f"read {len(files):,} files: {len(hashes):,} documents; skipped {_skip_summary(skipped)}")
    require(len(hashes) > 0, f"no text found in {_describe(inputs)} (skipped {_skip_summary(skipped)})")
    require(len(hashes) >= 2, f"only one document in {_describe(inputs)}; need at least 2 (train and val)")
    tok = _tokenizer_for(root, files, tok, settings, log)
    is_val = np.split(assign_val(hashes, settings["val_fraction"]), np.cumsum([len(h) for h in per_file])[:-1])
    tokenizer_json = tok.to_str()
    for job, scan, val in zip(jobs, scans, is_val):
        job.update(hashes=scan["hashes"], is_val=base64.b64encode(val.tobytes()).decode(),
                   tokenizer_json=tokenizer_json, shard_tokens=settings["shard_tokens"])
    records = run_tasks(_tokenize_task, jobs, engine, ray_address, Progress(len(jobs), "tokenized", log))
    manifest = _manifest(tok, records, settings["val_fraction"], len(files), len(hashes), skipped)
    storage.write_text(storage.join(root, "manifest.json"), json.dumps(manifest, indent=1))
    log(f"tokenized {len(hashes):,} documents into {manifest['total_tokens']:,} tokens "
        f"in {time.perf_counter() - start:.1f}s")
    return manifest


def _manifest(tok: Tokenizer, records: list[dict[str, Any]], val_fraction: float, n_files: int, n_docs: int,
              skipped: Counter[str]) -> dict[str, Any]:
    """The data dir's manifest: the tasks' shards in file order, their totals per split."""
    splits = {}
    for split in SPLITS:
        parts = [r["splits"][split] for r in records]
        splits[split] = {key: sum(p[key] for p in parts) for key in ("tokens", "documents", "bytes")}
        splits[split]["shards"] = [s for p in parts for s in p["shards"]]
    return {
        "format": FORMAT, "version": VERSION, "dtype": token_dtype(tok.get_vocab_size()).name,
        "vocab_size": tok.get_vocab_size(), "eot_id": eot_id(tok), "tokenizer": "tokenizer.json",
        "tokenizer_sha256": tokenizer_hash(tok), "val_fraction": val_fraction,
        "total_tokens": sum(s["tokens"] for s in splits.values()), "splits": splits,
        "sources": {"files": n_files, "documents": n_docs, "skipped": dict(sorted(skipped.items()))},
    }


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

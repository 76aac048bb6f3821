"""A prepared data dir, memory-mapped; the batch of a step is a pure function of (seed, step).

A prepared data dir holds
    tokenizer.json
    manifest.json            format version, dtype, vocab, tokenizer hash, per split its shards + sha256
    train_00000_00000.bin .. flat little-endian uint16 token ids (uint32 if the vocab needs it): each
    val_00000_00000.bin ...  document followed by EOT; a document never spans two shards

Batches: each shard is cut into non-overlapping windows of seq_len+1 tokens at stride seq_len (the
extra token is the target of the last position); windows never cross a shard boundary. Global
sample g of a run reads window perm_e[g % W], where W is the number of windows, e = g // W the epoch
and perm_e a permutation seeded by (seed, e). So every window is read once per epoch, and the batch
of a step is a function of (seed, step, batch_size, seq_len) only: not of the number of processes
and not of what was read before, which is what makes resume on another topology exact.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from anychip import storage
from anychip.data.stream import BlockCache, RemoteShard
from anychip.data.tokenizer import load_tokenizer, tokenizer_hash
from anychip.errors import UserError, require

FORMAT, VERSION = "anychip-tokens", 1
SPLITS = ("train", "val")



def read_manifest(data_dir: str | Path) -> dict:
    return _parse_manifest(data_dir, _manifest_text(data_dir))


def _parse_manifest(data_dir: str | Path, text: str) -> dict:
    try:
        manifest = json.loads(text)
    except ValueError:
        manifest = None
    _check_manifest(data_dir, manifest)
    return manifest


def _manifest_text(data_dir: str | Path) -> str:
    try:
        return storage.read_text(storage.join(data_dir, "manifest.json"))
    except (OSError, UnicodeDecodeError):
        return "null"
    except UserError as e:
        if storage.is_remote(data_dir) and "not found" not in str(e):
            raise  # credentials, endpoint: say that, not "not a data dir"
        return "null"


def _check_manifest(data_dir: str | Path, manifest: Any) -> None:
    try:
        ok = (manifest.get("format") == FORMAT and manifest.get("dtype") in ("uint16", "uint32")
              and isinstance(manifest.get("vocab_size"), int) and isinstance(manifest.get("splits"), dict)
              and isinstance(manifest.get("tokenizer_sha256"), str))
    except (ValueError, AttributeError):  # not an object
        ok = False
    require(ok, f"{data_dir} is not a prepared data dir, run `anychip data prepare`")
    require(manifest.get("version") == VERSION,
             f"{data_dir} has data format {manifest.get('version')}, this anychip reads {VERSION}; "
             "re-run anychip data prepare")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file or object, read in 1 MiB blocks (shards can be larger than memory)."""
    digest = hashlib.sha256()
    fs, inner = storage.filesystem(path)
    with fs.open(inner, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_shard(data_dir: str | Path, entry: dict, dtype: np.dtype, verify: bool,
                cache: BlockCache | None) -> np.memmap | RemoteShard:
    try:
        name, n_tokens, sha256 = str(entry["file"]), int(entry["tokens"]), str(entry["sha256"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{data_dir}/manifest.json has an invalid shard entry {entry!r}") from None
    # A manifest names files inside its own dir only.
    require(Path(name).name == name and n_tokens > 0, f"{data_dir}/manifest.json has an invalid shard {name!r}")
    path = storage.join(data_dir, name)
    require(storage.exists(path), f"missing shard {path}; re-run anychip data prepare")
    size, expected = storage.size(path), n_tokens * dtype.itemsize
    require(size == expected, f"{path} has {size:,} bytes but the manifest says {n_tokens:,} tokens "
             f"({expected:,} bytes): the file is truncated or was modified; re-run anychip data prepare")
    require(not verify or sha256_file(path) == sha256,
             f"checksum mismatch in {path}: the file is corrupt or was modified; re-run anychip data prepare")
    if cache is not None:
        return RemoteShard(path, n_tokens, dtype, cache)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


def _local_tokenizer(data_dir: str | Path) -> Path:
    """A local copy of a remote data dir's tokenizer.json (the tokenizers library reads local files)."""
    text = storage.read_text(storage.join(data_dir, "tokenizer.json"))
    folder = Path(tempfile.gettempdir()) / "anychip-tokenizers" / hashlib.sha256(text.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.json"
    if not path.is_file():
        storage.write_text(path, text)
    return path


def _process_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Rows [lo, hi) of a global batch that process `process_index` of `process_count` reads."""
    require(batch_size > 0, f"batch_size must be positive, got {batch_size}")
    require(0 <= process_index < process_count, f"process_index={process_index} not in [0, {process_count})")
    require(batch_size % process_count == 0,
             f"batch_size={batch_size} is not divisible by the number of processes ({process_count})")
    per_process = batch_size // process_count
    return process_index * per_process, (process_index + 1) * per_process


class TokenDataset:
    """One split of a prepared data dir, memory-mapped (local) or streamed (object storage, data/stream.py,
    with a read cache of at most `cache_bytes`); batches are pure functions of (seed, step)."""

    def __init__(self, data_dir: str | Path, split: str = "train", verify: bool = True,
                 cache_bytes: int = 1 << 30):
        remote = storage.is_remote(data_dir)
        self.data_dir: str | Path = str(data_dir).rstrip("/") if remote else storage.local_path(data_dir)
        self.manifest_text = _manifest_text(self.data_dir)
        self.manifest_sha256 = hashlib.sha256(self.manifest_text.encode("utf-8")).hexdigest()
        self.manifest = _parse_manifest(self.data_dir, self.manifest_text)
        self.split = split
        entries = self.manifest["splits"].get(split)
        entries = entries.get("shards") if isinstance(entries, dict) else None
        require(isinstance(entries, list) and len(entries) > 0, f"{self.data_dir} has no '{split}' split")
        self.vocab_size: int = self.manifest["vocab_size"]
        self.tokenizer_path = _local_tokenizer(self.data_dir) if remote else self.data_dir / "tokenizer.json"
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        cache = BlockCache(cache_bytes) if remote else None
        self.shards = [_open_shard(self.data_dir, e, dtype, verify, cache) for e in entries]
        if verify:
            require(tokenizer_hash(load_tokenizer(self.tokenizer_path)) == self.manifest["tokenizer_sha256"],
                     f"{self.tokenizer_path} is not the tokenizer the data was prepared with; "
                     "re-run anychip data prepare")
        self._window_ends: dict[int, np.ndarray] = {}
        self._permutations: dict[tuple[int, ...], np.ndarray] = {}

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    def _ends(self, seq_len: int) -> np.ndarray:
        """Cumulative window counts: shard i holds global windows [ends[i-1], ends[i])."""
        require(seq_len > 0, f"seq_len must be positive, got {seq_len}")
        if seq_len not in self._window_ends:
            counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
            self._window_ends[seq_len] = np.cumsum(counts)
        return self._window_ends[seq_len]

    def num_windows(self, seq_len: int) -> int:
        return int(self._ends(seq_len)[-1])

    def _require_windows(self, seq_len: int) -> int:
        n_windows = self.num_windows(seq_len)
        require(n_windows > 0, f"the {self.split} split of {self.data_dir} has {self.n_tokens:,} tokens "
                 f"(largest shard {max(len(s) for s in self.shards):,}), fewer than one window of "
                 f"seq_len+1={seq_len + 1}")
        return n_windows

    def _locate(self, windows: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, start tokens) of global windows."""
        ends = self._ends(seq_len)
        shard_ids = np.searchsorted(ends, windows, side="right")
        return shard_ids, (windows - np.concatenate([[0], ends[:-1]])[shard_ids]) * seq_len

    def _read(self, windows: np.ndarray, seq_len: int) -> np.ndarray:
        shard_ids, starts = self._locate(windows, seq_len)
        rows = np.empty((len(windows), seq_len + 1), dtype=np.int32)  # (rows, seq_len + 1)
        for row, (shard, start) in enumerate(zip(shard_ids, starts)):
            rows[row] = self.shards[shard][start:start + seq_len + 1]
        return rows

    def _permutation(self, rng_key: tuple[int, ...], n_windows: int) -> np.ndarray:
        # A batch needs at most the current and the next epoch (unless batch_size > W), and read-ahead
        # the one after: keep four (a mixture's components each keep their own).
        key = (*rng_key, n_windows)
        if key not in self._permutations:
            if len(self._permutations) >= 4:
                self._permutations.pop(next(iter(self._permutations)))
            self._permutations[key] = np.random.default_rng(list(rng_key)).permutation(n_windows)
        return self._permutations[key]

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int, process_index: int = 0,
              process_count: int = 1) -> np.ndarray:
        """(batch_size // process_count, seq_len + 1) int32: this process's rows of the global batch of `step`."""
        require(step >= 0 and seed >= 0, f"step and seed must be >= 0, got step={step} seed={seed}")
        lo, hi = _process_rows(batch_size, process_index, process_count)
        # Read-ahead (object storage): the next step's blocks are fetched while this step trains.
        self.prefetch((step + 1) * batch_size + np.arange(lo, hi, dtype=np.int64), seq_len, seed)
        return self.rows(step * batch_size + np.arange(lo, hi, dtype=np.int64), seq_len, seed)

    def rows(self, samples: np.ndarray, seq_len: int, seed: int, stream: int | None = None) -> np.ndarray:
        """(len(samples), seq_len + 1) int32: the windows of global sample ids `samples`. `stream` names
        an independent order of the same windows (a mixture's component)."""
        return self._read(self._windows(samples, seq_len, seed, stream), seq_len)

    def prefetch(self, samples: np.ndarray, seq_len: int, seed: int, stream: int | None = None) -> None:
        """Start fetching what `rows` will read (shards in object storage; a no-op for local files)."""
        if isinstance(self.shards[0], RemoteShard):
            for shard, start in zip(*self._locate(self._windows(samples, seq_len, seed, stream), seq_len)):
                self.shards[shard].prefetch(slice(start, start + seq_len + 1))

    def _windows(self, samples: np.ndarray, seq_len: int, seed: int, stream: int | None) -> np.ndarray:
        """The global windows of global sample ids `samples`: sample g reads perm_e[g % W], e = g // W."""
        n_windows = self._require_windows(seq_len)
        epochs, positions = np.divmod(samples, n_windows)
        windows = np.empty_like(samples)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            key = [seed, int(epoch)] if stream is None else [seed, int(epoch), stream]
            windows[here] = self._permutation(tuple(key), n_windows)[positions[here]]
        return windows

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None, process_index: int = 0,
                     process_count: int = 1) -> Iterator[np.ndarray]:
        """Sequential windows from the start of the split; the last partial batch is dropped.

        A split with fewer windows than `batch_size` (tiny validation sets) gives one batch of all its
        windows, rounded down to a multiple of `process_count`.
        """
        require(batch_size > 0, f"batch_size must be positive, got {batch_size}")
        n_windows = self._require_windows(seq_len)
        size = min(batch_size, n_windows) // process_count * process_count
        require(size > 0, f"the {self.split} split of {self.data_dir} has {n_windows} windows of "
                 f"seq_len+1={seq_len + 1}, fewer than the {process_count} processes")
        lo, hi = _process_rows(size, process_index, process_count)
        n_batches = n_windows // size if max_batches is None else min(max_batches, n_windows // size)
        return (self._read(np.arange(b * size + lo, b * size + hi), seq_len) for b in range(n_batches))

    def sliding_windows(self, seq_len: int, stride: int) -> Iterator[tuple[np.ndarray, int]]:
        """Every target token of the split exactly once, each after up to seq_len - stride tokens of context
        (the sliding-window perplexity of Hugging Face's guide; stride = seq_len: non-overlapping windows).

        Per shard, windows of up to seq_len + 1 tokens start every `stride` tokens; the last one is shorter
        and ends at the shard's end. Yields (tokens (n + 1,) int32, n_context): the window's first
        n_context targets were scored by the window before it.
        """
        require(0 < stride <= seq_len, f"stride must be in [1, seq_len={seq_len}], got {stride}")
        for shard in self.shards:
            start, scored = 0, 0  # targets are tokens 1..len-1; those up to `scored` are done
            while scored < len(shard) - 1:
                end = min(start + seq_len, len(shard) - 1)  # this window's last target
                yield np.asarray(shard[start:end + 1], np.int32), scored - start
                start, scored = start + stride, end


"""Shards in object storage, read as if memory-mapped: byte ranges through a bounded cache with read-ahead.

A training step reads batch_size random windows of a few KiB. Each is served from fixed-size blocks of
its shard, fetched with ranged GETs on a thread pool and kept in an LRU bounded by `cache_bytes`; the
dataset asks for the next step's blocks while the current step trains (`prefetch`), so a host needs
no shared filesystem and no local copy of the corpus, and the bytes are exactly the object's bytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from anychip import storage

BLOCK_BYTES = 256 << 10  # one ranged GET: large enough to amortize a request, small for random windows
FETCH_THREADS = 16  # requests in flight; object stores answer each in tens of milliseconds


class BlockCache:
    """(url, block) -> bytes, fetched once, at most `cache_bytes` kept (least recently used dropped)."""

    def __init__(self, cache_bytes: int, block_bytes: int = BLOCK_BYTES):
        self.block_bytes = block_bytes
        self.max_blocks = max(64, cache_bytes // block_bytes)
        self._blocks: OrderedDict[tuple[str, int], Future[bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="anychip-read")
        self.fetched = 0

    def _fetch(self, url: str, block: int, size: int) -> bytes:
        start = block * self.block_bytes
        data = storage.read_bytes(url, start, min(start + self.block_bytes, size))
        self.fetched += 1
        return data

    def _future(self, url: str, block: int, size: int) -> Future[bytes]:
        key = (url, block)
        with self._lock:
            future = self._blocks.get(key)
            if future is None:
                future = self._blocks[key] = self._pool.submit(self._fetch, url, block, size)
                while len(self._blocks) > self.max_blocks:
                    self._blocks.popitem(last=False)
            else:
                self._blocks.move_to_end(key)
            return future

    def prefetch(self, url: str, start: int, end: int, size: int) -> None:
        """Start fetching bytes [start, end) of `url` (of `size` bytes) without waiting."""
        for block in range(start // self.block_bytes, (end - 1) // self.block_bytes + 1):
            self._future(url, block, size)

    def read(self, url: str, start: int, end: int, size: int) -> bytes:
        """Bytes [start, end) of `url`."""
        first, last = start // self.block_bytes, (end - 1) // self.block_bytes
        futures = [self._future(url, b, size) for b in range(first, last + 1)]
        data = b"".join(f.result() for f in futures)
        offset = first * self.block_bytes
        return data[start - offset:end - offset]


class RemoteShard:
    """A shard object read through a BlockCache: len() and slicing like the np.memmap of a local shard."""

    def __init__(self, url: str, n_tokens: int, dtype: np.dtype, cache: BlockCache):
        self.url, self.n_tokens, self.dtype, self.cache = url, n_tokens, dtype, cache
        self.size = n_tokens * dtype.itemsize

    def __len__(self) -> int:
        return self.n_tokens

    def _bounds(self, index: slice) -> tuple[int, int]:
        start, stop, step = index.indices(self.n_tokens)
        assert step == 1, "shards are read in contiguous windows"
        return start * self.dtype.itemsize, max(start, stop) * self.dtype.itemsize

    def __getitem__(self, index: slice) -> np.ndarray:
        start, end = self._bounds(index)
        if start == end:
            return np.empty(0, self.dtype)
        return np.frombuffer(self.cache.read(self.url, start, end, self.size), self.dtype)

    def prefetch(self, index: slice) -> None:
        start, end = self._bounds(index)
        if start < end:
            self.cache.prefetch(self.url, start, end, self.size)

"""A weighted mixture of prepared data dirs, read like one TokenDataset.

`data.mixture` is a YAML list of {path, weight} (inline text or the path of a YAML file):

    - {path: s3://corpus/web, weight: 0.7}
    - {path: /data/code, weight: 0.3}

Row r of the global batch of step s comes from component c = choice(weights) drawn by a generator
seeded with (seed, s, MIXTURE_STREAM): the same on every process and for any process count, so each
process reads only its rows and resume (on any topology) is exact. Within component c, the row reads
the component's own shuffled order (its permutations are seeded by (seed, epoch, c)) at the row's
global sample id s × batch_size + r: each component is an independent stream of windows, and the
batch of a step depends on (seed, s, mixture) only, never on what was read before. The realized
proportions of the steps trained so far are counted from the same draws (`realized`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from anychip import storage
from anychip.data.dataset import TokenDataset, _process_rows
from anychip.errors import UserError, require

MIXTURE_STREAM = 0x6D6978  # "mix": keeps the component draws apart from any other use of (seed, step)


def parse_mixture(spec: str) -> list[dict[str, Any]]:
    """[{path, weight}] from inline YAML or a YAML file; weights positive and finite, normalized to sum 1."""
    text = spec
    if not spec.lstrip().startswith(("[", "-", "{")):
        try:
            text = storage.read_text(spec)
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"data.mixture: cannot read {spec} ({e})") from None
    try:
        entries = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"data.mixture is not YAML ({str(e).splitlines()[0]})") from None
    require(isinstance(entries, list) and len(entries) > 0,
             "data.mixture must be a non-empty list of {path, weight}")
    for entry in entries:
        require(isinstance(entry, dict) and set(entry) == {"path", "weight"} and isinstance(entry["path"], str)
                and entry["path"].strip() != "",
                 f"data.mixture: each entry needs exactly a path and a weight, got {entry!r}")
        weight = entry["weight"]
        require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 < weight < float("inf"),
                 f"data.mixture: weight of {entry['path']} must be a positive number, got {weight!r}")
    paths = [e["path"] for e in entries]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    require(not twice, f"data.mixture lists {', '.join(twice)} more than once: give each data dir one weight")
    # Scaled by the largest first, so that weights near the float maximum do not sum to inf.
    largest = max(float(e["weight"]) for e in entries)
    scaled = [float(e["weight"]) / largest for e in entries]
    total = sum(scaled)
    return [{"path": e["path"], "weight": w / total} for e, w in zip(entries, scaled)]


class MixtureDataset:
    """One split of every component, mixed by weight; the TokenDataset interface the trainer uses."""

    def __init__(self, entries: list[dict[str, Any]], split: str = "train", verify: bool = True,
                 cache_bytes: int = 1 << 30):
        self.entries = entries
        self.components = [TokenDataset(e["path"], split, verify, cache_bytes // len(entries)) for e in entries]
        self.weights = np.array([e["weight"] for e in entries], dtype=np.float64)
        first = self.components[0]
        for entry, ds in zip(entries, self.components):
            require(ds.manifest["tokenizer_sha256"] == first.manifest["tokenizer_sha256"],
                     f"data.mixture: {entry['path']} was tokenized with another tokenizer than "
                     f"{entries[0]['path']}; prepare every component with the same --tokenizer")
        self.split, self.data_dir = split, "mixture(" + ", ".join(e["path"] for e in entries) + ")"
        self.tokenizer_path: Path = first.tokenizer_path
        self.vocab_size = first.vocab_size
        # What the run records as its data: the components, their weights and their manifests' hashes.
        record = {"mixture": [{**e, "manifest_sha256": ds.manifest_sha256} for e, ds in zip(entries, self.components)],
                  **{k: first.manifest[k] for k in ("format", "version", "dtype", "vocab_size", "tokenizer_sha256")}}
        self.manifest = record
        self.manifest_text = json.dumps(record, indent=1)
        self.manifest_sha256 = hashlib.sha256(self.manifest_text.encode("utf-8")).hexdigest()

    def choices(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """(batch_size,) the component of every row of the global batch of `step`."""
        rng = np.random.default_rng([seed, step, MIXTURE_STREAM])
        return rng.choice(len(self.components), size=batch_size, p=self.weights)

    def _read(self, step: int, batch_size: int, seq_len: int, seed: int, lo: int, hi: int, fetch: bool
              ) -> np.ndarray | None:
        picks = self.choices(step, batch_size, seed)[lo:hi]
        samples = step * batch_size + np.arange(lo, hi, dtype=np.int64)
        rows = None if fetch else np.empty((hi - lo, seq_len + 1), np.int32)  # (rows, seq_len + 1)
        for c, ds in enumerate(self.components):
            here = picks == c
            if not here.any():
                continue
            if fetch:
                ds.prefetch(samples[here], seq_len, seed, stream=c)
            else:
                rows[here] = ds.rows(samples[here], seq_len, seed, stream=c)  # type: ignore[index]
        return rows

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int, process_index: int = 0,
              process_count: int = 1) -> np.ndarray:
        """(batch_size // process_count, seq_len + 1) int32: this process's rows of the global batch of `step`."""
        require(step >= 0 and seed >= 0, f"step and seed must be >= 0, got step={step} seed={seed}")
        lo, hi = _process_rows(batch_size, process_index, process_count)
        self._read(step + 1, batch_size, seq_len, seed, lo, hi, fetch=True)  # read-ahead
        return self._read(step, batch_size, seq_len, seed, lo, hi, fetch=False)  # type: ignore[return-value]

    def realized(self, steps: int, batch_size: int, seed: int, start: int = 0) -> dict[str, float]:
        """Share of each component (by path) in the rows of steps [start, steps)."""
        counts = np.zeros(len(self.components), np.int64)
        for step in range(start, steps):
            counts += np.bincount(self.choices(step, batch_size, seed), minlength=len(self.components))
        total = max(1, int(counts.sum()))
        return {e["path"]: float(n) / total for e, n in zip(self.entries, counts)}

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None, process_index: int = 0,
                     process_count: int = 1) -> Iterator[np.ndarray]:
        """A fixed sample of the mixed split (seed 0): as many batches as the smallest component fills,
        at most `max_batches`."""
        fill = min(ds.num_windows(seq_len) for ds in self.components) // batch_size
        n = max(1, fill) if max_batches is None else min(max_batches, max(1, fill))
        return (self.batch(b, batch_size, seq_len, 0, process_index, process_count) for b in range(n))

    def sliding_windows(self, seq_len: int, stride: int) -> Iterator[tuple[np.ndarray, int]]:
        """Every component's windows in turn (scoring covers each component's split whole)."""
        for ds in self.components:
            yield from ds.sliding_windows(seq_len, stride)

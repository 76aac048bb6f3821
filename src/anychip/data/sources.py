"""Finding input files (local paths, folders, globs, s3:// gs:// URLs) and reading their documents.

`.jsonl`: one document per line (a text field); `.parquet` and `.arrow` (Hugging Face `save_to_disk`
folders are read through their arrow files): one per row of a text column; anything else: one UTF-8
document per file. `.gz` and `.zst` files are decompressed as they stream (`x.jsonl.gz` is jsonl).
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from glob import glob
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from anychip import storage
from anychip.errors import UserError, require

COMPRESSED = (".gz", ".zst")
# The files a `datasets.save_to_disk` folder keeps besides its arrow data: metadata, not documents.
HF_METADATA = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})


def _visible(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _walk(folder: Path, skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Files under `folder` in a stable order. Hidden entries (.git, .venv, .DS_Store) are tooling, not text;
    in a Hugging Face `save_to_disk` folder only the arrow files are data."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in skip_dirs)
        if "state.json" in names and "dataset_info.json" in names:
            names = [n for n in names if n.endswith(".arrow")]
        files += [Path(root, n) for n in _visible(names) if n not in HF_METADATA]
    return files


def _expand_local(spec: str) -> list[str]:
    path = storage.local_path(spec)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return [str(p) for p in _walk(path)]
    matches = sorted(glob(str(path), recursive=True)) if set("*?[") & set(spec) else []
    require(bool(matches), f"input not found: {spec}")
    return [f for match in matches for f in _expand_local(match)]


def _expand_remote(spec: str) -> list[str]:
    fs, inner = storage.filesystem(spec)
    if set("*?[") & set(inner):
        found = sorted(storage._checked(spec, fs.glob, inner))
    elif storage._checked(spec, fs.isfile, inner):
        found = [inner]
    else:
        found = sorted(storage._checked(spec, fs.find, inner))
    found.sort(key=lambda f: _walk_order(f[len(inner):]))
    names = {f.rsplit("/", 1)[-1] for f in found}
    hf_folder = "state.json" in names and "dataset_info.json" in names
    kept = [f for f in found
            if not any(part.startswith(".") for part in f[len(inner):].split("/"))
            and f.rsplit("/", 1)[-1] not in HF_METADATA and (not hf_folder or f.endswith(".arrow"))]
    require(bool(kept), f"input not found: {spec}")
    return [storage.as_url(f, spec) for f in kept]


def _walk_order(relative: str) -> tuple[tuple[int, str], ...]:
    """The order `_walk` gives: in each folder its files by name, then its subfolders by name (so a
    corpus lists the same way locally and in a bucket, and prepares into the same bytes)."""
    parts = relative.strip("/").split("/")
    return (*((1, d) for d in parts[:-1]), (0, parts[-1]))


def find_files(inputs: list[str]) -> list[str]:
    """The files named by `inputs` (files, folders searched recursively, globs; local or URLs), each once,
    in a stable order."""
    expanded = (f for spec in inputs for f in (_expand_remote(spec) if storage.is_remote(spec)
                                                 else _expand_local(spec)))
    return list(dict.fromkeys(expanded))


def stdlib_sources(root: str | Path, excluded: frozenset[str]) -> list[Path]:
    """The `.py` files of a standard library tree, without the folders in `excluded`."""
    return [p for p in _walk(Path(root), excluded) if p.suffix == ".py"]


def _kind(path: str) -> tuple[str, str]:
    """(the format suffix, the compression suffix or '') of a file name: x.jsonl.zst -> ('.jsonl', '.zst')."""
    name = path.rsplit("/", 1)[-1].lower()
    compression = next((c for c in COMPRESSED if name.endswith(c)), "")
    stem = name[:len(name) - len(compression)]
    return (os.path.splitext(stem)[1], compression)


def open_input(path: str) -> IO[bytes]:
    """A binary stream of `path`'s (decompressed) bytes; local or remote."""
    _, compression = _kind(path)
    if storage.is_remote(path):
        fs, inner = storage.filesystem(path)
        raw: Any = storage._checked(path, fs.open, inner, "rb", block_size=8 << 20)
    else:
        raw = open(storage.local_path(path), "rb")  # noqa: SIM115 (the caller closes the stream)
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise UserError(f"{path}: .zst inputs need zstandard: pip install zstandard") from None
        # Buffered: the bare stream reader cannot iterate lines.
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))  # type: ignore[arg-type]
    return raw


def _file_texts(path: str, skipped: Counter[str]) -> list[str]:
    try:
        with open_input(path) as f:
            return [f.read().decode("utf-8")]
    except (OSError, EOFError):
        skipped["unreadable_files"] += 1
    except UnicodeDecodeError:
        skipped["non_utf8_files"] += 1
    return []


def _jsonl_texts(path: str, field: str, skipped: Counter[str]) -> Iterator[str]:
    try:
        with open_input(path) as f:
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
    except (OSError, EOFError):
        skipped["unreadable_files"] += 1


def _batches(path: str, suffix: str, column: str, skipped: Counter[str]) -> Iterator[pa.RecordBatch]:
    """Record batches of `column` (they keep memory flat however large the file is)."""
    with open_input(path) as f:
        if suffix == ".parquet":
            parquet = pq.ParquetFile(f)
            if column not in parquet.schema_arrow.names:
                skipped["records_without_text"] += parquet.metadata.num_rows
                return
            yield from parquet.iter_batches(batch_size=1024, columns=[column])
            return
        # .arrow: `datasets` writes the IPC stream format; the file format has a footer instead.
        data = pa.BufferReader(f.read())
        try:
            reader: Any = pa.ipc.open_stream(data)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(data)
        if column not in reader.schema.names:
            skipped["records_without_text"] += sum(b.num_rows for b in _all_batches(reader))
            return
        for batch in _all_batches(reader):
            yield batch.select([column])


def _all_batches(reader: Any) -> Iterator[pa.RecordBatch]:
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    return iter(reader)


def _table_texts(path: str, suffix: str, column: str, skipped: Counter[str]) -> Iterator[str]:
    try:
        for batch in _batches(path, suffix, column, skipped):
            for text in batch.column(0).to_pylist():
                if text is None or isinstance(text, str):
                    yield text or ""
                else:
                    skipped["records_without_text"] += 1
    except (OSError, EOFError, pa.ArrowException):
        skipped["unreadable_files"] += 1


def read_documents(files: list[str], skipped: Counter[str], text_field: str = "text",
                   parquet_column: str = "text") -> Iterator[str]:
    """Every non-empty document of `files`; what is left out is counted in `skipped`, by reason."""
    for path in files:
        suffix, _ = _kind(path)
        if suffix == ".jsonl":
            texts: Iterable[str] = _jsonl_texts(path, text_field, skipped)
        elif suffix in (".parquet", ".arrow"):
            texts = _table_texts(path, suffix, parquet_column, skipped)
        else:
            texts = _file_texts(path, skipped)
        for text in texts:
            if text.strip():
                yield text
            else:
                skipped["empty_documents"] += 1

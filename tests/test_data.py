import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import anychip
from anychip.data import prepare as preparing
from anychip.data.dataset import TokenDataset
from anychip.data.prepare import assign_val, builtin_corpus, prepare, stdlib_sources, token_dtype
from anychip.data.tokenizer import load_tokenizer, train_tokenizer
from anychip.errors import UserError

# ---------------------------------------------------------------------------------------------
# A mixed corpus: every input kind and every reason to skip


TEXT_DOCS = {
    "corpus/a.txt": "alpha document one\n",
    "corpus/sub/b.md": "# Title\n\nSome *markdown* text.\n",
    "corpus/sub/deeper/c.py": "def f(x):\n    return x + 1\n",
    "globbed/x1.log": "first log line\nsecond log line\n",
    "globbed/x2.log": "another log: ünïcödé ✓\n",
}
JSONL_DOCS = ["json doc one", "json doc two ✓ 中文"]
PARQUET_DOCS = ["parquet doc one", "parquet doc two 🦀"]
ALL_DOCS = sorted([*TEXT_DOCS.values(), *JSONL_DOCS, *PARQUET_DOCS])


def write_mixed_corpus(root: Path) -> list[str]:
    for name, text in TEXT_DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "corpus/latin1.txt").write_bytes(b"caf\xe9 au lait\n")  # not UTF-8
    (root / "corpus/empty.txt").write_text("")
    (root / "corpus/.hidden.txt").write_text("hidden files are not read")
    (root / "globbed/not-matched.dat").write_text("the glob only takes *.log")
    lines = [
        json.dumps({"body": JSONL_DOCS[0], "text": "wrong field"}),
        "this line is not JSON",
        json.dumps({"other": "no body"}),
        "",
        json.dumps({"body": ""}),
        json.dumps({"body": 5}),
        json.dumps({"body": JSONL_DOCS[1]}),
    ]
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    table = pa.table({"id": [1, 2, 3, 4], "content": [PARQUET_DOCS[0], None, "   ", PARQUET_DOCS[1]]})
    pq.write_table(table, root / "table.parquet")
    # corpus/a.txt is named twice (directly and through its folder): it must be read once.
    return [str(root / "corpus"), str(root / "globbed/*.log"), str(root / "records.jsonl"),
            str(root / "table.parquet"), str(root / "corpus/a.txt")]


def read_split(out: Path, manifest: dict, split: str) -> list[np.ndarray]:
    """The shards of a split, read straight from disk (not through TokenDataset)."""
    return [np.fromfile(out / s["file"], dtype="<u2") for s in manifest["splits"][split]["shards"]]


def decode_docs(tok, shards: list[np.ndarray]) -> list[str]:
    stream = np.concatenate(shards)
    ends = np.flatnonzero(stream == 0)  # EOT is id 0
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(stream[s:e].tolist()) for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    inputs = write_mixed_corpus(root)
    logs: list[str] = []
    manifest = prepare(inputs, root / "out", vocab_size=300, val_fraction=0.3, text_field="body",
                       parquet_column="content", log=logs.append)
    return root, inputs, manifest, logs


def test_prepare_counts_documents_and_skips(mixed):
    _, _, manifest, logs = mixed
    sources = manifest["sources"]
    assert sources["files"] == 9  # 5 in corpus/ (hidden excluded), 2 globbed, jsonl, parquet
    assert sources["documents"] == 9
    assert sources["skipped"] == {
        "non_utf8_files": 1,
        "empty_documents": 4,  # empty.txt, {"body": ""}, parquet None and "   "
        "invalid_json_lines": 1,
        "records_without_text": 2,  # {"other": ...} and {"body": 5}
    }
    assert any("1 non utf8 files" in line and "4 empty documents" in line for line in logs)


def test_prepare_splits_are_disjoint_complete_and_consistent(mixed):
    root, _, manifest, _ = mixed
    out = root / "out"
    tok = load_tokenizer(out / "tokenizer.json")
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 300
    docs = {}
    for split in ("train", "val"):
        info, shards = manifest["splits"][split], read_split(out, manifest, split)
        stream = np.concatenate(shards)
        assert info["tokens"] == len(stream) == sum(s["tokens"] for s in info["shards"])
        assert int((stream == 0).sum()) == info["documents"] >= 1  # one EOT per document
        for entry, shard in zip(info["shards"], shards):
            assert (out / entry["file"]).stat().st_size == 2 * entry["tokens"]
            assert hashlib.sha256(shard.tobytes()).hexdigest() == entry["sha256"]
        docs[split] = decode_docs(tok, shards)
        assert info["bytes"] == sum(len(d.encode()) for d in docs[split])
    assert sorted(docs["train"] + docs["val"]) == ALL_DOCS
    assert not set(docs["train"]) & set(docs["val"])
    assert manifest["total_tokens"] == manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_split_does_not_depend_on_input_order_and_tokenizer_can_be_reused(mixed, tmp_path):
    root, inputs, manifest, _ = mixed
    again = prepare(inputs[::-1], tmp_path / "again", tokenizer=str(root / "out/tokenizer.json"),
                    val_fraction=0.3, text_field="body", parquet_column="content", log=lambda s: None)
    assert again["tokenizer_sha256"] == manifest["tokenizer_sha256"]
    tok = load_tokenizer(root / "out/tokenizer.json")
    val_before = decode_docs(tok, read_split(root / "out", manifest, "val"))
    val_after = decode_docs(tok, read_split(tmp_path / "again", again, "val"))
    assert sorted(val_before) == sorted(val_after)


def test_shards_end_at_document_boundaries(mixed, tmp_path):
    root, inputs, _, _ = mixed
    manifest = prepare(inputs, tmp_path / "small", tokenizer=str(root / "out/tokenizer.json"), shard_tokens=20,
                       val_fraction=0.3, text_field="body", parquet_column="content", log=lambda s: None)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 1
    for entry, tokens in zip(shards, read_split(tmp_path / "small", manifest, "train")):
        assert tokens[-1] == 0  # ends with EOT
        assert entry["documents"] == int((tokens == 0).sum())
        assert len(tokens) <= 20 or entry["documents"] == 1


def test_token_dtype():
    assert token_dtype(8192) == np.dtype("<u2")
    assert token_dtype(65536) == np.dtype("<u2")  # ids 0..65535 fit
    assert token_dtype(65537) == np.dtype("<u4")


def test_assign_val():
    hashes = np.array([0, 2**31, 2**32 - 1], dtype=np.uint32)
    assert assign_val(hashes, 0.5).tolist() == [True, False, False]
    # Nothing under the threshold: the smallest hash is held out anyway.
    assert assign_val(np.array([5, 3, 9], dtype=np.uint32), 0.0).tolist() == [False, True, False]
    # Everything under the threshold: the largest hash is kept for training.
    assert assign_val(np.array([1, 2], dtype=np.uint32), 0.9).tolist() == [True, False]


def test_no_text_is_a_user_error_and_leaves_nothing(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/empty.txt").write_text("")
    (tmp_path / "in/binary.dat").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match=r"no text found in .*1 empty documents, 1 non utf8 files"):
        prepare([str(tmp_path / "in")], tmp_path / "out", log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no out dir, no temp dir


def test_one_document_is_a_user_error(tmp_path):
    (tmp_path / "only.txt").write_text("just one document")
    with pytest.raises(UserError, match="only one document"):
        prepare([str(tmp_path / "only.txt")], tmp_path / "out", log=lambda s: None)


@pytest.mark.parametrize("spec", ["missing.txt", "nothing/*.txt"])
def test_missing_inputs_are_user_errors(tmp_path, spec):
    with pytest.raises(UserError, match="input not found"):
        prepare([str(tmp_path / spec)], tmp_path / "out", log=lambda s: None)


def test_existing_out_dir_is_never_overwritten(mixed, tmp_path):
    _, inputs, _, _ = mixed
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="already exists and is not empty"):
        prepare(inputs, out, log=lambda s: None)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"


def test_empty_existing_out_dir_is_filled(mixed, tmp_path):
    root, inputs, _, _ = mixed
    (tmp_path / "out").mkdir()
    prepare(inputs, tmp_path / "out", tokenizer=str(root / "out/tokenizer.json"), text_field="body",
            parquet_column="content", log=lambda s: None)
    assert (tmp_path / "out/manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------
# TokenDataset on a synthetic corpus whose token stream we read straight from the shards

SEQ = 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 8))) for _ in range(300)]
    for i in range(60):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choices(words, k=rng.randint(20, 80))) + "\n")
    out = root / "out"
    prepare([str(root / "*.txt")], out, vocab_size=300, val_fraction=0.2, shard_tokens=700, log=lambda s: None)
    return out


def expected_windows(out: Path, split: str, seq_len: int) -> np.ndarray:
    """(W, seq_len + 1): every window of every shard, by brute force over the files on disk."""
    manifest = json.loads((out / "manifest.json").read_text())
    windows = []
    for tokens in read_split(out, manifest, split):
        start = 0
        while start + seq_len + 1 <= len(tokens):
            windows.append(tokens[start:start + seq_len + 1])
            start += seq_len
    return np.array(windows, dtype=np.int32)


@pytest.fixture(scope="module")
def windows(prepared):
    w = expected_windows(prepared, "train", SEQ)
    assert len(np.unique(w, axis=0)) == len(w)  # every window is identifiable by its content
    return w


def window_ids(windows: np.ndarray, rows: np.ndarray) -> list[int]:
    ids = []
    for row in rows:
        (match,) = np.flatnonzero((windows == row).all(axis=1))  # exactly one window matches
        ids.append(int(match))
    return ids


def test_dataset_attributes(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    ds = TokenDataset(prepared, "train")
    assert len(manifest["splits"]["train"]["shards"]) > 1
    assert ds.n_tokens == manifest["splits"]["train"]["tokens"]
    assert ds.vocab_size == 300 and ds.manifest == manifest
    assert ds.tokenizer_path == prepared / "tokenizer.json" and ds.data_dir == prepared
    assert ds.num_windows(SEQ) == len(expected_windows(prepared, "train", SEQ))


def test_batch_rows_are_windows_of_the_token_stream(prepared, windows):
    ds = TokenDataset(prepared)
    rows = ds.batch(3, 8, SEQ, seed=0)
    assert rows.shape == (8, SEQ + 1) and rows.dtype == np.int32
    window_ids(windows, rows)  # raises unless each row is exactly one window: inputs row[:-1], targets row[1:]


def test_one_epoch_reads_every_window_once_and_three_epochs_three_times(prepared, windows):
    ds = TokenDataset(prepared)
    n = len(windows)
    batch_size = 3  # need not divide W: batches then straddle epochs
    rows = np.concatenate([ds.batch(step, batch_size, SEQ, seed=5) for step in range(n)])  # 3 epochs
    ids = window_ids(windows, rows)
    assert sorted(ids[:n]) == list(range(n))
    assert Counter(ids) == {i: 3 for i in range(n)}
    assert ids[:n] != ids[n:2 * n]  # each epoch has its own order


def test_exact_epoch_with_dividing_batch_size(prepared, windows):
    ds = TokenDataset(prepared)
    n = len(windows)
    batch_size = max(d for d in range(1, 9) if n % d == 0)
    rows = np.concatenate([ds.batch(step, batch_size, SEQ, seed=1) for step in range(n // batch_size)])
    assert sorted(window_ids(windows, rows)) == list(range(n))


def test_different_seeds_give_different_orders(prepared):
    ds = TokenDataset(prepared)
    assert not np.array_equal(ds.batch(0, 8, SEQ, seed=0), ds.batch(0, 8, SEQ, seed=1))


def test_batch_is_pure_and_process_independent(prepared):
    ds = TokenDataset(prepared)
    first = ds.batch(7, 8, SEQ, seed=3)
    ds.batch(1000, 8, SEQ, seed=9)  # other calls in between must not matter
    assert np.array_equal(ds.batch(7, 8, SEQ, seed=3), first)
    assert np.array_equal(TokenDataset(prepared, verify=False).batch(7, 8, SEQ, seed=3), first)
    for count in (1, 2, 4):
        parts = [ds.batch(7, 8, SEQ, 3, process_index=p, process_count=count) for p in range(count)]
        assert all(part.shape == (8 // count, SEQ + 1) for part in parts)
        assert np.array_equal(np.concatenate(parts), first)


def test_batch_is_identical_in_a_fresh_process(prepared, tmp_path):
    code = ("import sys, numpy as np; from anychip.data.dataset import TokenDataset; "
            "np.save(sys.argv[2], TokenDataset(sys.argv[1]).batch(7, 8, 16, seed=3, process_index=1, "
            "process_count=2))")
    env = {**os.environ, "PYTHONPATH": str(Path(anychip.__file__).parents[1])}
    subprocess.run([sys.executable, "-c", code, str(prepared), str(tmp_path / "b.npy")], check=True, env=env)
    expected = TokenDataset(prepared).batch(7, 8, SEQ, seed=3)[4:]
    assert np.array_equal(np.load(tmp_path / "b.npy"), expected)


def test_batch_user_errors(prepared):
    ds = TokenDataset(prepared)
    with pytest.raises(UserError, match="not divisible by the number of processes"):
        ds.batch(0, 6, SEQ, 0, process_index=0, process_count=4)
    with pytest.raises(UserError, match="fewer than one window of seq_len"):
        ds.batch(0, 8, 10**6, 0)


def test_eval_batches_are_sequential_windows(prepared):
    ds = TokenDataset(prepared, "val")
    expected = expected_windows(prepared, "val", SEQ)
    n = len(expected)
    batches = list(ds.eval_batches(4, SEQ, None))
    assert len(batches) == n // 4  # the last partial batch is dropped
    assert np.array_equal(np.concatenate(batches), expected[: n // 4 * 4])
    assert len(list(ds.eval_batches(4, SEQ, 2))) == 2
    halves = [next(ds.eval_batches(4, SEQ, 1, process_index=p, process_count=2)) for p in range(2)]
    assert np.array_equal(np.concatenate(halves), expected[:4])


def test_eval_batches_on_a_split_smaller_than_a_batch(prepared):
    ds = TokenDataset(prepared, "val")
    expected = expected_windows(prepared, "val", SEQ)
    n = len(expected)
    (only,) = ds.eval_batches(n + 100, SEQ, None)
    assert np.array_equal(only, expected)
    parts = [list(ds.eval_batches(n + 100, SEQ, None, p, 2)) for p in range(2)]
    assert np.array_equal(np.concatenate([parts[0][0], parts[1][0]]), expected[: n // 2 * 2])


# ---------------------------------------------------------------------------------------------
# Damaged data dirs


def test_corrupted_shard_fails_checksum(prepared, tmp_path):
    copy = Path(shutil.copytree(prepared, tmp_path / "copy"))
    name = json.loads((copy / "manifest.json").read_text())["splits"]["train"]["shards"][1]["file"]
    shard = copy / name
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=rf"checksum mismatch in .*{name}"):
        TokenDataset(copy)
    TokenDataset(copy, verify=False)  # the size still matches: only the checksum can tell


def test_truncated_shard_fails(prepared, tmp_path):
    copy = Path(shutil.copytree(prepared, tmp_path / "copy"))
    name = json.loads((copy / "manifest.json").read_text())["splits"]["val"]["shards"][0]["file"]
    shard = copy / name
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match=rf"{name} has .* bytes .* truncated"):
        TokenDataset(copy, "val", verify=False)


def test_replaced_tokenizer_fails(prepared, tmp_path):
    copy = Path(shutil.copytree(prepared, tmp_path / "copy"))
    (copy / "tokenizer.json").write_text(train_tokenizer(["another corpus"] * 3, 300).to_str())
    with pytest.raises(UserError, match="not the tokenizer the data was prepared with"):
        TokenDataset(copy)


@pytest.mark.parametrize("manifest", [None, "not json", '["a list"]', '{"format": "other"}'])
def test_not_a_data_dir(tmp_path, manifest):
    if manifest is not None:
        (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(UserError, match="not a prepared data dir, run `anychip data prepare`"):
        TokenDataset(tmp_path)


# ---------------------------------------------------------------------------------------------
# The built-in corpus, on a fake standard library


def fake_stdlib(root: Path) -> None:
    files = {
        "os.py": "import sys\n\ndef getcwd():\n    return '/'\n",
        "json/__init__.py": "from json.decoder import JSONDecoder\n",
        "json/tool.py": "def main():\n    print('json tool')\n",
        "test/test_os.py": "excluded test suite\n",
        "unittest/test/test_case.py": "excluded nested test suite\n",
        "lib2to3/tests/data.py": "excluded tests\n",
        "idlelib/editor.py": "excluded IDLE\n",
        "encodings/cp1252.py": "excluded charmap table\n",
        "site-packages/numpy/core.py": "excluded installed package\n",
        ".hidden/secret.py": "excluded hidden\n",
        "README.txt": "not python\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_stdlib_sources_excludes_tests_packages_and_idle(tmp_path):
    fake_stdlib(tmp_path)
    found = sorted(p.relative_to(tmp_path).as_posix() for p in stdlib_sources(tmp_path))
    assert found == ["json/__init__.py", "json/tool.py", "os.py"]


def test_builtin_corpus_is_prepared_once(tmp_path, monkeypatch):
    fake_stdlib(tmp_path / "lib")
    monkeypatch.setattr(preparing.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path / "lib")})
    logs: list[str] = []
    path = builtin_corpus(tmp_path / "cache", vocab_size=300, log=logs.append)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert path == tmp_path / "cache" / f"stdlib-py{version}-v300"
    assert TokenDataset(path).manifest["sources"]["documents"] == 3
    logs.clear()
    assert builtin_corpus(tmp_path / "cache", vocab_size=300, log=logs.append) == path
    assert logs == []  # reused, not prepared again

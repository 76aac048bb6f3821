"""Data, runs and checkpoints in object storage, against moto's standalone S3 server (tests/s3_server.py)
with s3fs as the client: the same bytes and batches as locally, a run trained, checkpointed and resumed
entirely from the store, and bad URLs refused in one line."""

import json
import subprocess
import sys

import numpy as np
import pytest
from s3_server import make_bucket, moto_s3, upload, write_corpus

from anychip import storage
from anychip.config import load_config
from anychip.data.dataset import TokenDataset
from anychip.data.prepare import prepare
from anychip.errors import UserError
from anychip.train.loop import train
from anychip.train.run_dir import RunDir

TINY_RUN = ["model=tiny", "model.vocab_size=512", "train.batch_size=8", "train.seq_len=64", "log.every=1",
            "eval.batches=2", "eval.every=100", "eval.sample_tokens=0", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def s3():
    storage._remote_fs.cache_clear()  # a filesystem made for another endpoint must not be reused
    with moto_s3() as endpoint:
        yield endpoint
    storage._remote_fs.cache_clear()


def data_files(folder: str) -> dict[str, bytes]:
    """Every file of a data dir (local or URL), by name."""
    return {name: storage.read_bytes(storage.join(folder, name)) for name in storage.listdir(folder)}


@pytest.fixture(scope="module")
def prepared(s3, tmp_path_factory):
    """The corpus prepared twice: from the bucket into the bucket, and locally."""
    root = tmp_path_factory.mktemp("s3data")
    src = write_corpus(root)
    bucket = make_bucket("data")
    upload(src, f"{bucket}/corpus")
    kwargs = {"vocab_size": 512, "val_fraction": 0.1, "shard_tokens": 20_000, "log": lambda _: None}
    remote = prepare([f"{bucket}/corpus"], f"{bucket}/prepared", **kwargs)
    local = prepare([str(src)], root / "prepared", **kwargs)
    return f"{bucket}/prepared", root / "prepared", remote, local


def test_prepare_from_s3_to_s3_is_byte_identical_to_local(prepared):
    remote_dir, local_dir, remote, local = prepared
    assert remote == local and remote["sources"] == {"files": 10, "documents": 12, "skipped": {}}
    assert len(remote["splits"]["train"]["shards"]) > 1
    remote_files, local_files = data_files(remote_dir), data_files(str(local_dir))
    assert remote_files == local_files  # no .prepare/ left behind either
    assert ".prepare" not in storage.listdir(remote_dir)


def test_streamed_batches_equal_local_batches(prepared):
    remote_dir, local_dir, _, _ = prepared
    # A cache of 64 blocks (the minimum) over ~0.2 MB of shards: reads come from the server, not memory.
    streamed, local = TokenDataset(remote_dir, cache_bytes=0), TokenDataset(local_dir)
    for step in (0, 1, 7, 40):  # 40: past one epoch
        assert np.array_equal(streamed.batch(step, 8, 64, seed=3), local.batch(step, 8, 64, seed=3))
    assert streamed.shards[0].cache.fetched > 0
    assert streamed.manifest_sha256 == local.manifest_sha256
    evals = zip(streamed.eval_batches(8, 64, 3), local.eval_batches(8, 64, 3), strict=True)
    assert all(np.array_equal(a, b) for a, b in evals)


def train_in_s3(prepared, tmp_path, name: str):
    """Run A trains 4 steps with data and run_dir in the bucket; B resumes from the bucket alone (the
    working copy is emptied first) to step 6."""
    remote_dir, _, _, _ = prepared
    run_url = make_bucket("runs") + "/" + name
    common = [*TINY_RUN, f"data.cache_dir={tmp_path / 'cache'}", "checkpoint.every_steps=2",
              f"data.path={remote_dir}", f"run_dir={run_url}"]
    a = train(load_config(None, [*common, "train.steps=4"]), log=lambda _: None)
    assert a.steps == 4
    assert storage.exists(f"{run_url}/checkpoints/4/.uploaded") and storage.exists(f"{run_url}/metrics.jsonl")
    assert not storage.exists(f"{run_url}/lock")  # released at the end
    a_rows = [json.loads(line) for line in storage.read_text(f"{run_url}/metrics.jsonl").splitlines()]
    logs: list[str] = []
    b = train(load_config(None, [*common, "train.steps=6"]), log=logs.append)
    assert any("fetched checkpoint 4" in line for line in logs) and b.steps == 6
    rows = [json.loads(line) for line in storage.read_text(f"{run_url}/metrics.jsonl").splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert losses[:4] == [r["loss"] for r in a_rows if "loss" in r]
    assert storage.exists(f"{run_url}/checkpoints/6/.uploaded")
    return b, losses


def test_train_checkpoint_and_resume_in_s3(prepared, tmp_path):
    train_in_s3(prepared, tmp_path, "a")


@pytest.mark.slow
def test_resume_from_s3_is_bit_identical_to_an_uninterrupted_local_run(prepared, tmp_path):
    """Same backend, same bytes: the run resumed from the bucket ends bit-identical to one that trained
    6 steps straight on the local copy of the data."""
    b, losses = train_in_s3(prepared, tmp_path, "bit")
    c = train(load_config(None, [*TINY_RUN, f"data.cache_dir={tmp_path / 'cache'}", "checkpoint.every_steps=2",
                                 f"data.path={prepared[1]}", f"run_dir={tmp_path / 'c'}", "train.steps=6"]),
              log=lambda _: None)
    for x, y in zip(jax_leaves(b.params), jax_leaves(c.params), strict=True):
        assert np.array_equal(x, y)
    assert losses == [r["loss"] for r in RunDir(tmp_path / "c").read_metrics() if "loss" in r]


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_a_second_trainer_is_refused_by_the_lock_object(s3):
    from anychip.train.remote_run import RemoteLock

    url = make_bucket("locks") + "/run"
    first = RemoteLock(url, print)
    first.acquire()
    try:
        with pytest.raises(UserError, match="in use by another trainer"):
            RemoteLock(url, print).acquire()
    finally:
        first.release()
    again = RemoteLock(url, print)
    again.acquire()  # free once released
    again.release()


@pytest.mark.parametrize("url, message", [
    ("ftp://host/data", "unknown storage scheme ftp://"),
    ("s3://no-such-bucket/data", "bucket no-such-bucket does not exist"),
])
def test_bad_urls_are_one_line_before_any_work(s3, tmp_path, url, message):
    (tmp_path / "a.txt").write_text("one document")
    (tmp_path / "b.txt").write_text("another document")
    with pytest.raises(UserError, match=message):
        prepare([str(tmp_path)], url, vocab_size=300, log=lambda _: None)


def test_cli_unreachable_endpoint_and_missing_credentials_exit_2(s3, tmp_path):
    (tmp_path / "a.txt").write_text("one document")
    base = {k: v for k, v in __import__("os").environ.items() if not k.startswith("AWS_")}
    cases = [({**base, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "cannot reach"),  # port 9: nothing listens
             ({**base, "AWS_ENDPOINT_URL": s3, "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")},
              "no credentials")]
    for env, message in cases:
        r = subprocess.run([sys.executable, "-m", "anychip.cli", "data", "prepare", str(tmp_path),
                            "--out", "s3://data/x"], check=False, capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2, r.stderr
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_hugging_face_save_to_disk_folder_in_a_bucket(s3, tmp_path):
    """A `datasets.save_to_disk` folder (arrow stream files + state.json + dataset_info.json) and a bare
    .parquet file: only the rows' text is read, the same documents from the bucket as locally."""
    datasets = pytest.importorskip("datasets")
    texts = [f"document number {i}: " + "word " * (i % 7 + 1) for i in range(40)]
    datasets.Dataset.from_dict({"text": texts, "id": list(range(40))}).save_to_disk(str(tmp_path / "hf"))
    bucket = make_bucket("hfdata")
    upload(tmp_path / "hf", f"{bucket}/hf")
    remote = prepare([f"{bucket}/hf"], tmp_path / "from_s3", vocab_size=300, log=lambda _: None)
    local = prepare([str(tmp_path / "hf")], tmp_path / "local", vocab_size=300, log=lambda _: None)
    assert remote == local
    assert remote["sources"] == {"files": 1, "documents": 40, "skipped": {}}  # the arrow file only


def test_export_to_and_import_from_s3_equal_the_local_paths(s3, tmp_path):
    """A run exported into the bucket holds the same bytes as one exported locally; importing it back
    from the bucket (into a local run dir and into the bucket) restores the weights bit-exactly."""
    import dataclasses

    import jax

    from anychip.config import Config, ModelConfig, TrainConfig
    from anychip.data.tokenizer import train_tokenizer
    from anychip.interop.hf import export_hf, import_hf, write_run
    from anychip.model.params import init_params
    from anychip.train.run_dir import load_run

    model = ModelConfig(name="t", vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                        max_seq_len=64)
    tokenizer = train_tokenizer([f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)], 300)
    params = init_params(model, jax.random.key(1))
    run = write_run(Config(model=model, train=TrainConfig(seq_len=32), run_dir=str(tmp_path / "run")), params,
                    tokenizer, source="test")
    bucket = make_bucket("models")
    local_hf = export_hf(run, tmp_path / "hf", max_shard_bytes=20_000)  # sharded: an index and several files
    assert export_hf(run, f"{bucket}/hf", max_shard_bytes=20_000) == f"{bucket}/hf"
    assert data_files(f"{bucket}/hf") == data_files(str(local_hf)) and len(storage.listdir(f"{bucket}/hf")) > 6
    with pytest.raises(UserError, match="not empty"):
        export_hf(run, f"{bucket}/hf")

    back = import_hf(f"{bucket}/hf", tmp_path / "back")
    cfg, restored, _ = load_run(back)
    assert dataclasses.replace(cfg.model, name="t") == model and cfg.model.name == "hf"  # named by the prefix
    jax.tree.map(np.testing.assert_array_equal, restored, params)  # bit-exact

    # A run directory in the bucket, in the layout a trainer writes there, exported from the bucket.
    assert import_hf(f"{bucket}/hf", f"{bucket}/imported") == f"{bucket}/imported"
    assert storage.exists(f"{bucket}/imported/checkpoints/0/.uploaded")
    again = export_hf(f"{bucket}/imported", tmp_path / "again", max_shard_bytes=20_000)
    assert data_files(str(again)) == data_files(str(local_hf))

    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not opened")
    upload(tmp_path / "pickled", f"{bucket}/pickled")
    with pytest.raises(UserError, match="refusing to load pickle-based weights"):
        import_hf(f"{bucket}/pickled", tmp_path / "never")
    assert not (tmp_path / "never").exists()

"""Preparation on a real local Ray cluster, from and to moto's S3 server: byte-identical to the local
engine, and a preparation killed with SIGKILL resumes, skipping the tasks it had finished. Ray's
start-up takes many seconds, so these run in the long job."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3_server import make_bucket, moto_s3, upload, write_corpus

from anychip import storage
from anychip.data import prepare as preparing

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
SETTINGS = {"vocab_size": 512, "val_fraction": 0.1, "shard_tokens": 20_000, "log": lambda _: None}
TASK_BYTES = 30_000  # the ~170 kB corpus in several tasks, so Ray runs them side by side


@pytest.fixture(scope="module")
def cluster():
    storage._remote_fs.cache_clear()
    with moto_s3() as endpoint:  # first: the Ray workers inherit its environment
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield endpoint
        finally:
            ray.shutdown()
    storage._remote_fs.cache_clear()


def files_of(folder: str) -> dict[str, bytes]:
    return {n: storage.read_bytes(storage.join(folder, n)) for n in storage.listdir(folder)}


def test_ray_engine_output_is_byte_identical_to_the_local_engine(cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(preparing, "TASK_BYTES", TASK_BYTES)
    bucket = make_bucket("raydata")
    upload(write_corpus(tmp_path), f"{bucket}/corpus")
    logs: list[str] = []
    by_ray = preparing.prepare([f"{bucket}/corpus"], f"{bucket}/ray", engine="ray", **{**SETTINGS, "log": logs.append})
    by_local = preparing.prepare([f"{bucket}/corpus"], f"{bucket}/local", engine="local", **SETTINGS)
    assert by_ray == by_local
    assert files_of(f"{bucket}/ray") == files_of(f"{bucket}/local")
    n_tasks = len({s["file"].split("_")[1] for s in by_ray["splits"]["train"]["shards"]})
    assert n_tasks > 2
    progress = [line for line in logs if line.startswith("tokenized ") and "tokens/s" in line]
    assert len(progress) >= n_tasks and progress[-1].startswith(f"tokenized {len(progress)}/{len(progress)} tasks")


KILLABLE = """
import sys
from anychip.data import prepare as preparing
preparing.TASK_BYTES = {task_bytes}
preparing.prepare(sys.argv[1:2], sys.argv[2], engine="ray", vocab_size=512, val_fraction=0.1, shard_tokens=20_000)
"""


def test_a_killed_ray_preparation_resumes_where_it_stopped(cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(preparing, "TASK_BYTES", 400_000)
    bucket = make_bucket("raykill")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):  # ~0.5 MB per file, each its own task: a few seconds of tokenizing each on 2 cores
        words = " ".join(f"w{(i * 7919 + j * 104729) % 5000}" for j in range(80_000))
        (corpus / f"part{i:02d}.txt").write_text(words)
    upload(corpus, f"{bucket}/corpus")
    out = f"{bucket}/out"
    # Its own Ray: the process group (the driver and the cluster it starts) is killed at once.
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE.format(task_bytes=400_000), f"{bucket}/corpus", out],
                            env={**os.environ, "PYTHONPATH": str(Path(preparing.__file__).parents[2])},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    records = storage.join(out, ".prepare")
    try:
        deadline = time.monotonic() + 300
        while not any(n.startswith("tokenize_") for n in storage.listdir(records)):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no task finished in 5 minutes"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    fs = storage.filesystem(out)[0]
    done = {}  # a finished task's shards -> when the killed run uploaded them
    for name in storage.listdir(records):
        if name.startswith("tokenize_"):
            record = json.loads(storage.read_text(storage.join(records, name)))
            for split in record["splits"].values():
                done.update({s["file"]: fs.info(f"raykill/out/{s['file']}")["LastModified"] for s in split["shards"]})
    assert not storage.exists(storage.join(out, "manifest.json")) and len(done) < 12
    resumed = preparing.prepare([f"{bucket}/corpus"], out, engine="ray", **SETTINGS)
    fresh = preparing.prepare([str(corpus)], tmp_path / "fresh", engine="local", **SETTINGS)
    assert resumed == fresh
    assert files_of(out) == files_of(str(tmp_path / "fresh"))
    # The finished tasks were skipped: their shards were not uploaded again.
    assert done
    for shard, uploaded in done.items():
        assert fs.info(f"raykill/out/{shard}")["LastModified"] == uploaded
    assert json.loads(storage.read_text(storage.join(out, "manifest.json")))["sources"]["files"] == 12

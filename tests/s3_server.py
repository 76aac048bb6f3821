"""moto's standalone S3 server on loopback (a random port), with the environment every client here reads:
s3fs/botocore and tensorstore take AWS_ENDPOINT_URL; subprocesses and local Ray workers inherit it."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import zstandard

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextmanager
def moto_s3() -> Iterator[str]:
    """Start the server, point the environment at it, yield its endpoint URL; restore the environment."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def make_bucket(name: str) -> str:
    from anychip import storage

    fs, _ = storage.filesystem(f"s3://{name}")
    if not fs.exists(name):
        fs.mkdir(name)
    return f"s3://{name}"


def upload(local: Path, url: str) -> None:
    from anychip import storage

    fs, inner = storage.filesystem(url)
    fs.put(str(local) + "/", inner + "/", recursive=True)


def write_corpus(root: Path) -> Path:
    """Every input kind a bucket may hold: plain files in folders, .jsonl.gz, .jsonl.zst."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    src = root / "corpus"
    shutil.copytree(stdlib / "json", src / "json", ignore=shutil.ignore_patterns("__pycache__", "tests"))
    for name in ("textwrap.py", "string.py", "dataclasses.py"):
        shutil.copy(stdlib / name, src / name)
    lines = "".join(json.dumps({"text": (stdlib / n).read_text()}) + "\n" for n in ("shlex.py", "glob.py"))
    (src / "docs.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    lines = "".join(json.dumps({"text": (stdlib / n).read_text()}) + "\n" for n in ("fnmatch.py", "bisect.py"))
    (src / "more.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    return src

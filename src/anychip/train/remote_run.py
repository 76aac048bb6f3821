"""A run directory in object storage (run_dir: s3://bucket/run, gs://...): trained through a local working copy.

orbax-checkpoint (0.12) writes remote checkpoints only to gs:// (its tensorstore spec builder knows the
gcs driver; an s3:// path falls through to the file driver), and `RunDir` appends, truncates and
flocks, which an object store cannot. So a remote run_dir is mirrored:

* start: the working copy (DATA.CACHE_DIR/runs/<hash of the URL>) is emptied and filled from the store:
  the run's own files and its newest *committed* checkpoint (older ones stay in the store only);
* during training, each checkpoint orbax has finalized locally (a folder named by its step: orbax
  renames it into place when complete) is uploaded, then its commit marker `CHECKPOINT/.uploaded` is
  written last; a checkpoint without the marker is invisible to the next start. Checkpoints that
  retention removed locally are removed from the store after the newer one is committed;
* the run's other files (metrics.jsonl, config.yaml, ...) are uploaded with every checkpoint and at
  the end, so the store's metrics are never behind its newest checkpoint.

The lock: object stores have no flock. RUN/lock is created with a conditional PUT (If-None-Match: *):
exactly one of two trainers that start together gets it; the holder rewrites it every LOCK_BEAT_S, and
a lock not rewritten for LOCK_STALE_S (its holder died) is taken over with a warning. Two trainers
taking over the same stale lock at the same instant can both proceed (the takeover is a delete then
a conditional PUT, not one atomic step); docs/data.md says so. One process writes: a remote run_dir
is for single-process runs (every process would need its own copy of what orbax wrote).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax

from anychip import storage
from anychip.config import Config, replace
from anychip.errors import UserError

MARKER = ".uploaded"
LOCK_BEAT_S = 60.0
LOCK_STALE_S = 300.0


def working_copy(cfg: Config) -> Path:
    digest = hashlib.sha256(cfg.run_dir.encode("utf-8")).hexdigest()[:16]
    return Path(cfg.data.cache_dir).expanduser() / "runs" / digest


def _steps(names: list[str]) -> list[int]:
    return sorted(int(n) for n in names if n.isdigit())


class Mirror:
    """The store's copy of a run directory and the working copy training writes."""

    def __init__(self, url: str, local: Path, log: Callable[[str], None]):
        self.url, self.local, self.log = url.rstrip("/"), local, log
        self.fs, self.root = storage.filesystem(self.url)
        self._sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) uploaded
        self._committed: set[int] = set()
        self._busy = threading.Lock()

    def committed_steps(self) -> list[int]:
        folder = storage.join(self.url, "checkpoints")
        return [s for s in _steps(storage.listdir(folder))
                if storage.exists(storage.join(folder, str(s), MARKER))]

    def pull(self) -> None:
        """Empty the working copy, then fill it with the run's files and its newest committed checkpoint."""
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        for name in storage.listdir(self.url):
            if name not in ("checkpoints", "lock") and not name.startswith("checkpoints."):
                self._get(name)
        steps = self.committed_steps()
        self._committed = set(steps)
        if steps:
            self._get(f"checkpoints/{steps[-1]}")
            (self.local / "checkpoints" / str(steps[-1]) / MARKER).unlink(missing_ok=True)
            self.log(f"{self.url}: fetched checkpoint {steps[-1]} into {self.local}")
        for path in self.local.rglob("*"):
            if path.is_file():
                self._sent[str(path.relative_to(self.local))] = _stamp(path)

    def _get(self, name: str) -> None:
        source, dest = f"{self.root}/{name}", self.local / name
        if storage._checked(self.url, self.fs.isdir, source):
            storage._checked(self.url, self.fs.get, source + "/", str(dest) + "/", recursive=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            storage._checked(self.url, self.fs.get_file, source, str(dest))

    def push(self) -> None:
        """Upload new finalized checkpoints (then their markers), then the run's changed files."""
        with self._busy:
            local_steps = _steps(os.listdir(self.local / "checkpoints")) if (self.local / "checkpoints").is_dir() else []
            for step in local_steps:
                if step not in self._committed:
                    self._put_tree(f"checkpoints/{step}")
                    storage.write_bytes(storage.join(self.url, "checkpoints", str(step), MARKER), b"")
                    self._committed.add(step)
            for step in sorted(self._committed - set(local_steps)):
                if local_steps and step < local_steps[-1]:  # retention removed it, a newer one is committed
                    storage.remove_tree(storage.join(self.url, "checkpoints", str(step)))
                    self._committed.discard(step)
            for path in sorted(self.local.rglob("*")):
                rel = str(path.relative_to(self.local))
                if path.is_file() and not rel.startswith("checkpoints/") and rel != "lock":
                    self._put_file(path, rel)

    def _put_tree(self, rel: str) -> None:
        for path in sorted((self.local / rel).rglob("*")):
            if path.is_file():
                self._put_file(path, str(path.relative_to(self.local)))

    def _put_file(self, path: Path, rel: str) -> None:
        stamp = _stamp(path)
        if self._sent.get(rel) != stamp:
            storage._checked(self.url, self.fs.put_file, str(path), f"{self.root}/{rel}")
            self._sent[rel] = stamp


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class RemoteLock:
    """RUN/lock held by a conditional PUT and a heartbeat (see the module docstring for the guarantee)."""

    def __init__(self, url: str, log: Callable[[str], None]):
        self.path, self.log = storage.join(url, "lock"), log
        self.fs, self.inner = storage.filesystem(self.path)
        self._stop = threading.Event()

    def _holder(self) -> bytes:
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return json.dumps({"holder": f"host {socket.gethostname()}, pid {os.getpid()}", "beat": time.time(),
                           "since": since}).encode()

    def acquire(self) -> None:
        try:
            self.fs.pipe_file(self.inner, self._holder(), mode="create")
        except (FileExistsError, OSError) as e:
            if not storage._checked(self.path, self.fs.exists, self.inner):
                raise UserError(storage.describe_error(self.path, e)) from None
            self._take_over_if_stale()
        threading.Thread(target=self._beat, name="anychip-lock", daemon=True).start()

    def _take_over_if_stale(self) -> None:
        try:
            held = json.loads(storage.read_text(self.path))
        except (ValueError, UserError):
            held = {"holder": "an unreadable lock", "beat": 0.0}
        age = time.time() - float(held.get("beat", 0.0))
        if age < LOCK_STALE_S:
            raise UserError(f"{self.path.rsplit('/', 1)[0]} is in use by another trainer ({held.get('holder')}, "
                            f"alive {age:.0f}s ago); wait for it to end or choose another run_dir")
        self.log(f"warning: taking over the lock of {self.path} from {held.get('holder')}, silent for {age:.0f}s")
        storage._checked(self.path, self.fs.rm_file, self.inner)
        try:
            self.fs.pipe_file(self.inner, self._holder(), mode="create")
        except (FileExistsError, OSError):
            raise UserError(f"{self.path}: another trainer took over the lock first") from None

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_BEAT_S):
            with contextlib.suppress(Exception):  # a missed beat only shortens the others' wait
                self.fs.pipe_file(self.inner, self._holder())

    def release(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self.fs.rm_file(self.inner)


class PushCallback:
    """A training callback: after each step, upload a checkpoint orbax has finished since the last one."""

    def __init__(self, mirror: Mirror):
        self.mirror = mirror
        self._thread: threading.Thread | None = None
        self.folder = mirror.local / "checkpoints"

    def __call__(self, step: int, state: Any) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        if self.folder.is_dir() and set(_steps(os.listdir(self.folder))) - self.mirror._committed:
            self._thread = threading.Thread(target=self.mirror.push, name="anychip-upload", daemon=True)
            self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


@contextmanager
def remote_run(cfg: Config, log: Callable[[str], None]) -> Iterator[tuple[Config, list[Any]]]:
    """(cfg with run_dir on the working copy, callbacks) for a remote run_dir; cfg unchanged otherwise."""
    if not storage.is_remote(cfg.run_dir):
        yield cfg, []
        return
    storage.check_reachable(cfg.run_dir)
    if jax.process_count() > 1:
        raise UserError(f"run_dir={cfg.run_dir}: a run directory in object storage is for single-process runs "
                        "(docs/data.md); use a shared filesystem for multi-host runs")
    lock, mirror = RemoteLock(cfg.run_dir, log), Mirror(cfg.run_dir, working_copy(cfg), log)
    lock.acquire()
    try:
        mirror.pull()
        push = PushCallback(mirror)
        try:
            yield replace(cfg, run_dir=str(mirror.local)), [push]
        finally:
            push.join()
            mirror.push()  # also after a failure or a stop: the checkpoints written so far are kept
            log(f"run directory uploaded to {cfg.run_dir}")
    finally:
        lock.release()


@contextmanager
def fetched_run(run_dir: str | Path, log: Callable[[str], None] = lambda _: None) -> Iterator[Path]:
    """A run directory to read: a local one as it is; one in object storage downloaded (its files and its
    newest committed checkpoint, as a trainer's start fetches them) into a temporary folder."""
    if not storage.is_remote(run_dir):
        yield storage.local_path(run_dir)
        return
    storage.check_reachable(run_dir)
    if not storage.listdir(run_dir):
        raise UserError(f"run directory not found: {run_dir}")
    with tempfile.TemporaryDirectory(prefix="anychip-run-") as tmp:
        mirror = Mirror(str(run_dir), Path(tmp) / "run", log)
        mirror.pull()
        yield mirror.local


def publish_run(local: Path, url: str) -> None:
    """Upload a finished local run directory to an empty `url` in the layout a remote run_dir has
    (checkpoints committed by their markers); a failure removes what was uploaded."""
    try:
        Mirror(url, local, lambda _: None).push()
    except BaseException:  # also Ctrl-C and SIGTERM: leave no half-uploaded run
        with contextlib.suppress(Exception):
            storage.remove_tree(url)
        raise

"""A run directory: every file a run keeps, and the one place that names them.

    lock                 held by the one trainer of this directory; names it (host, pid, since)
    config.yaml          the resolved config (itself a valid config file)
    tokenizer.json       the tokenizer the run trains with
    special_tokens.json  its bos/eos/pad tokens and chat template (data/chat.py; written once, yours to edit)
    data_manifest.json   the manifest of the data it trains on
    metrics.jsonl        one JSON object per logged step, evaluation or event
    checkpoints/         numbered checkpoints (train/checkpoint.py); checkpoints.<reason>/: set aside
    report.png           `anychip report`
    tensorboard/         event files, with log.tensorboard=true
    history/<time>/      an earlier run's files, moved here when a fresh start found them without a checkpoint

Only process 0 writes the run's own files and holds the lock; orbax coordinates the checkpoints' writes
itself. Nothing here deletes history: it is moved aside (docs/robustness.md).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from anychip.config import CheckpointConfig, Config, load_config, replace, save_config
from anychip.data.chat import PromptTokenizer, SpecialTokens
from anychip.data.tokenizer import load_tokenizer
from anychip.errors import UserError
from anychip.files import check_writable, read_text, storage_error, write_text_atomic
from anychip.train.checkpoint import Checkpointer
from anychip.train.step import abstract_state, build_trainer

# flock on these filesystems says "not supported" rather than locking: training goes on, unguarded.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    lock_file = property(lambda self: self.path / "lock")
    history = property(lambda self: self.path / "history")
    config = property(lambda self: self.path / "config.yaml")
    tokenizer = property(lambda self: self.path / "tokenizer.json")
    special_tokens = property(lambda self: self.path / "special_tokens.json")
    data_manifest = property(lambda self: self.path / "data_manifest.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    report = property(lambda self: self.path / "report.png")
    tensorboard = property(lambda self: self.path / "tensorboard")

    def __str__(self) -> str:
        return str(self.path)

    # -- one trainer per run directory -------------------------------------------------------

    def make(self) -> None:
        """Create the run directory and prove it takes a file (the checkpointer checks checkpoints/)."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"run_dir {self.path} is a file, not a directory; choose another run_dir")
        check_writable(self.path)

    @contextmanager
    def locked(self, log: Callable[[str], None] = print) -> Iterator[None]:
        """Hold the run directory for one trainer: a second one refuses at once, naming the holder.

        An exclusive flock on RUN_DIR/lock; the kernel (or the NFS server) drops it when its process
        dies, however it dies, so a lock file whose holder is gone is taken over with a warning. The
        file's text names the holder; it is emptied when the holder ends normally, and removed with the
        directory if this call created the directory and nothing else was written to it (a bad input).
        """
        created = not self.path.exists()
        self.make()
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise storage_error(self.lock_file, e) from None
        try:
            self._acquire(fd, log)
        except BaseException:
            os.close(fd)
            raise
        try:
            yield
        finally:
            with contextlib.suppress(OSError):  # the disk went read-only meanwhile: close() still unlocks
                os.ftruncate(fd, 0)  # free: the next trainer finds no holder to warn about
                if created and [p.name for p in self.path.iterdir()] == [self.lock_file.name]:
                    self.lock_file.unlink()
                    self.path.rmdir()
            os.close(fd)

    def _acquire(self, fd: int, log: Callable[[str], None]) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that is starting"
            raise UserError(f"{self.path} is in use by another trainer ({holder}); wait for it to end or "
                            "choose another run_dir") from None
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise storage_error(self.lock_file, e) from None
            log(f"warning: {self.path} is on a filesystem without file locks: nothing stops a second trainer "
                "from using it at the same time (docs/robustness.md)")
        previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if previous:
            log(f"warning: taking over the lock of {self.path} from {previous}, which is no longer running")
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        holder = f"host {socket.gethostname()}, pid {os.getpid()}, since {since}".encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder, 0)
        except OSError as e:
            raise storage_error(self.lock_file, e) from None

    def set_aside_history(self, log: Callable[[str], None]) -> None:
        """A fresh start where an earlier run left metrics but no checkpoint: move that run's files to
        history/<time>/ instead of writing over them."""
        if not (self.metrics_bytes() or self.tensorboard.exists()):
            return
        dest = self.history / time.strftime("%Y%m%d-%H%M%S")
        n = 1
        while dest.exists():
            dest, n = dest.with_name(f"{dest.name.split('.')[0]}.{n}"), n + 1
        moved = [p for p in (self.metrics, self.config, self.tokenizer, self.data_manifest, self.report,
                             self.tensorboard) if p.exists()]
        try:
            dest.mkdir(parents=True)
            for path in moved:
                os.replace(path, dest / path.name)
        except OSError as e:
            raise storage_error(dest, e, "cannot move the earlier run's files aside") from None
        log(f"starting fresh: {self.checkpoints} holds no checkpoint; moved the earlier run's "
            f"{', '.join(p.name for p in moved)} to {dest}")

    # -- the run's own files ----------------------------------------------------------------

    def write_files(self, cfg: Config, tokenizer_json: str, data_manifest_json: str | None = None,
                    special_tokens: SpecialTokens | None = None) -> None:
        """config.yaml, tokenizer.json, (when training on prepared data) data_manifest.json and (when
        given) special_tokens.json."""
        self.make()
        save_config(cfg, self.config)
        write_text_atomic(self.tokenizer, tokenizer_json)
        if data_manifest_json is not None:
            write_text_atomic(self.data_manifest, data_manifest_json)
        if special_tokens is not None:
            write_text_atomic(self.special_tokens, special_tokens.to_json())

    def read_special_tokens(self, tokenizer: Tokenizer) -> SpecialTokens:
        """special_tokens.json, checked against `tokenizer`; without one, the defaults of an anychip tokenizer."""
        if not self.special_tokens.is_file():
            return SpecialTokens.defaults(tokenizer)
        return SpecialTokens.from_json(read_text(self.special_tokens), tokenizer, str(self.special_tokens))

    def prompt_tokenizer(self, tokenizer: Tokenizer) -> PromptTokenizer:
        """`tokenizer` with this run's special tokens and chat template, for prompts (generate, serve, lm-eval)."""
        return PromptTokenizer(tokenizer, self.read_special_tokens(tokenizer))

    def read_config(self) -> Config:
        if not self.config.is_file():
            raise UserError(f"{self.path} is not a run directory (no config.yaml)")
        return load_config(self.config)

    def checkpointer(self, c: CheckpointConfig | None = None, log: Callable[[str], None] = print) -> Checkpointer:
        """The run's checkpoints as configured (trainers, imports); without a config, read-only (eval,
        generate, export: they may run next to a trainer and must not touch its saves in flight)."""
        if c is None:
            return Checkpointer(self.checkpoints, read_only=True, log=log)
        return Checkpointer.from_config(self.checkpoints, c, log)

    # -- metrics.jsonl ----------------------------------------------------------------------

    def metrics_bytes(self) -> int:
        return self.metrics.stat().st_size if self.metrics.is_file() else 0

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of metrics.jsonl (objects with an integer step); a last line cut short by a crash, or
        a line damaged otherwise, is left out."""
        try:
            text = self.metrics.read_text(encoding="utf-8", errors="replace") if self.metrics.is_file() else ""
        except OSError as e:
            raise storage_error(self.metrics, e, "cannot read") from None
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a row half-written when the process died: the resumed run writes it again
        return [r for r in rows if isinstance(r, dict) and type(r.get("step")) is int]

    def truncate_metrics(self, keep: int | None, log: Callable[[str], None]) -> None:
        """Cut metrics.jsonl back to `keep` bytes, its length when the restored checkpoint was written (0:
        starting fresh): rows a killed run wrote after its last checkpoint are written again, identically."""
        if keep is None or not self.metrics.is_file():
            return
        size = self.metrics.stat().st_size
        if size < keep:
            log(f"warning: {self.metrics} is shorter than when its checkpoint was written; left as is")
        elif size > keep:
            os.truncate(self.metrics, keep)

    def copy_metrics(self, folder: Path) -> Path | None:
        """A timestamped copy of metrics.jsonl in `folder` (before a rewind cuts it)."""
        if not self.metrics.is_file():
            return None
        dest = folder / f"metrics-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        shutil.copyfile(self.metrics, dest)
        return dest

    # -- the trained model ------------------------------------------------------------------

    def load_tokenizer(self, ckpt: Checkpointer, step: int) -> Tokenizer:
        """tokenizer.json, else the copy inside checkpoint `step` (a checkpoint copied on its own)."""
        if self.tokenizer.is_file() or (stored := ckpt.read_tokenizer(step)) is None:
            return load_tokenizer(self.tokenizer)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "tokenizer.json").write_text(json.dumps(stored), encoding="utf-8")
            return load_tokenizer(Path(tmp) / "tokenizer.json")


def load_run(run_dir: str | Path, step: int | None = None) -> tuple[Config, Any, Tokenizer]:
    """(config, params on this process's devices, tokenizer) of a run directory's newest checkpoint (or
    checkpoint `step`). Eval, generation, serving and export need no particular layout, so the saved mesh
    is replaced by all local devices on fsdp."""
    run = RunDir(run_dir)
    cfg = replace(run.read_config(), mesh={"data": 1, "fsdp": -1, "tensor": 1})
    ckpt = run.checkpointer()
    try:
        if not ckpt.all_steps():
            raise UserError(f"{run_dir} has no checkpoint")
        abstract = abstract_state(build_trainer(cfg))
        if step is None:  # the newest that restores intact (a damaged one is moved aside with a warning)
            step, state, _ = ckpt.restore_newest(abstract)  # type: ignore[misc]
        else:
            state, _ = ckpt.restore(step, abstract)
        tokenizer = run.load_tokenizer(ckpt, step)
    finally:
        ckpt.close()
    return cfg, state.params, tokenizer

"""Files that are complete or invisible, and text that reads or says clearly why not.

Writers build into a hidden temporary sibling and rename it into place: a reader, a crash or a full
disk never leaves a half-written file or folder under the final name. An error, Ctrl-C or SIGTERM
removes the temporary (SIGTERM is turned into `Terminated` while nothing else handles it); only a
SIGKILL or a power cut can leave one behind, hidden (`.NAME.tmp-*`), and never under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from anychip.errors import UserError


class Terminated(BaseException):
    """SIGTERM arrived while an output was being built; the CLI exits 143 (128 + SIGTERM)."""


def temporary_sibling(path: Path) -> Path:
    """A hidden, unique name next to `path`, on the same filesystem so a rename is atomic."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def storage_error(path: str | Path, error: OSError, doing: str = "cannot write") -> UserError:
    """A one-line UserError for a filesystem failure: full disk, read-only, permissions, a file in the way."""
    return UserError(f"{path}: {doing} ({error.strerror or error})")


# After SIGTERM/SIGINT, how long the main thread has to clean up itself before a watcher does it: the
# Python handler runs only between bytecodes, never inside a long native call (BPE training, a big write).
SIGNAL_GRACE_S = 2.0
_EXIT_CODES = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


@contextmanager
def removed_on_signal(tmp: Path) -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (and Ctrl-C KeyboardInterrupt) in the main thread, so
    the caller's cleanup runs; if the main thread is stuck in native code, a watcher thread woken by the
    signal removes `tmp` after SIGNAL_GRACE_S and exits. Left alone where another SIGTERM handler is
    installed (training's StopSignals) or outside the main thread."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    done, (read_fd, write_fd) = threading.Event(), os.pipe()
    os.set_blocking(write_fd, False)

    def raise_terminated(_signum: int, _frame: Any) -> None:
        raise Terminated("stopped by SIGTERM")

    def watch() -> None:  # the C-level handler writes each signal's number to write_fd, in any thread
        while data := os.read(read_fd, 64):
            signum = next((s for s in _EXIT_CODES if s in data), None)
            if signum is not None and not done.wait(SIGNAL_GRACE_S):
                _remove(tmp)
                os.write(2, f"anychip: stopped by {signal.Signals(signum).name}; removed {tmp}\n".encode())
                os._exit(_EXIT_CODES[signum])
        os.close(read_fd)

    signal.signal(signal.SIGTERM, raise_terminated)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=watch, name="anychip-signal-cleanup", daemon=True).start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.close(write_fd)  # the watcher reads end-of-file and ends


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it is synced and renamed onto `path`."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        with removed_on_signal(tmp):
            yield tmp
            with open(tmp, "rb+") as f:  # the bytes reach the disk before the name does (a power cut)
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except OSError as e:
        raise storage_error(path, e) from None
    finally:
        _remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary sibling and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and prove it takes a file (written, synced, removed), else a one-line
    UserError: a read-only mount, missing permissions or a full disk show before any work is done."""
    probe = temporary_sibling(folder / "write-probe")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "xb") as f:
            f.write(b"anychip")
            os.fsync(f.fileno())
    except OSError as e:
        raise storage_error(folder, e) from None
    finally:
        with contextlib.suppress(OSError):  # a read-only mount refuses even to unlink a missing file
            probe.unlink(missing_ok=True)


def check_new_directory(path: Path) -> None:
    """An output folder must not exist yet, or be empty: nothing of the user's is ever replaced."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path} already exists and is not empty; choose a new directory (nothing was changed)")


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary sibling folder of `path` to build; on success it is renamed to `path`
    (which must be absent or an empty folder), on any failure or SIGTERM it is removed."""
    path = Path(path)
    check_new_directory(path)
    tmp = temporary_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise storage_error(path.parent, e) from None
    try:
        with removed_on_signal(tmp):
            yield tmp
            try:
                os.rename(tmp, path)  # atomic; replaces `path` only if it is an empty folder
            except OSError as e:
                check_new_directory(path)  # it appeared meanwhile: say so
                raise storage_error(path, e) from None
    finally:
        _remove(tmp)


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of `path`; a missing, unreadable or non-UTF-8 file is a one-line UserError."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None

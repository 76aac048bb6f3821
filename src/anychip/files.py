"""Files that are complete or invisible, and text that reads or says clearly why not.

Writers build into a hidden temporary sibling and rename it into place: a reader, a crash or a full
disk never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from anychip.errors import UserError


def temporary_sibling(path: Path) -> Path:
    """A hidden, unique name next to `path`, on the same filesystem so a rename is atomic."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary sibling and a rename."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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

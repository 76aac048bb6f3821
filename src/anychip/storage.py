"""Paths that may be URLs: local files, s3:// (and S3-compatible stores), gs://, through fsspec.

Every place that takes a data dir, an input or an output path goes through here, so a new store needs
one entry in `_SCHEMES`. Credentials come only from the environment the store's own client reads:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_PROFILE, AWS_ENDPOINT_URL for an
S3-compatible store (MinIO, Ceph, moto), AWS_REGION; GOOGLE_APPLICATION_CREDENTIALS for GCS. Nothing
here reads credentials from a config file or a run directory.

Object stores have no rename: a file written here is one PUT, which the store makes visible whole or
not at all; a folder is complete when its marker file (a data dir's manifest.json) exists.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any

import fsspec

from anychip.errors import UserError
from anychip.files import write_text_atomic

# scheme -> (fsspec protocol, module it needs, pip extra)
_SCHEMES = {"s3": ("s3", "s3fs", "s3"), "gs": ("gcs", "gcsfs", "gcs"), "gcs": ("gcs", "gcsfs", "gcs")}
# A store that does not answer within this is reported as unreachable instead of retried for minutes.
CONNECT_TIMEOUT_S = 10


def scheme(path: str | Path) -> str:
    """'' for a local path (also file://), else the URL scheme ('s3', 'gs')."""
    text = str(path)
    if "://" not in text:
        return ""
    name = text.split("://", 1)[0].lower()
    if name == "file":
        return ""
    if name not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in sorted(_SCHEMES))
        raise UserError(f"{text}: unknown storage scheme {name}:// (use a local path, file://, {known})")
    return name


def is_remote(path: str | Path) -> bool:
    return scheme(path) != ""


def local_path(path: str | Path) -> Path:
    text = str(path)
    return Path(text.removeprefix("file://")).expanduser()


@functools.cache
def _remote_fs(name: str) -> Any:
    protocol, module, extra = _SCHEMES[name]
    try:
        __import__(module)
    except ImportError:
        raise UserError(f"{name}:// paths need {module}: pip install 'anychip[{extra}]'") from None
    if protocol == "s3":
        # botocore reads AWS_ENDPOINT_URL itself; the short timeouts make a wrong endpoint one error line.
        config = {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": 60, "retries": {"max_attempts": 3}}
        # No listings cache: other processes (Ray workers, other hosts) write the same prefixes.
        return fsspec.filesystem("s3", config_kwargs=config, skip_instance_cache=True, use_listings_cache=False)
    return fsspec.filesystem(protocol)


def filesystem(path: str | Path) -> tuple[Any, str]:
    """(fsspec filesystem, the path within it) for a local path or URL."""
    name = scheme(path)
    if not name:
        return fsspec.filesystem("file"), str(local_path(path))
    return _remote_fs(name), str(path).split("://", 1)[1].rstrip("/")


def join(base: str | Path, *names: str) -> str:
    """`base`/name/...; URLs keep their scheme, local paths stay local."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *names])
    return str(local_path(base).joinpath(*names))


def describe_error(path: str | Path, error: BaseException) -> str:
    """One line saying why `path` could not be reached: credentials, endpoint, permission, missing."""
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    kind = type(error).__name__
    if "NoCredentials" in kind or "credential" in text.lower():
        why = "no credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE; " \
              "GOOGLE_APPLICATION_CREDENTIALS for gs://)"
    elif "EndpointConnection" in kind or "ConnectTimeout" in kind or "Connect" in text and "timeout" in text.lower():
        why = f"cannot reach the store's endpoint ({os.environ.get('AWS_ENDPOINT_URL', 'the default endpoint')})"
    elif isinstance(error, PermissionError):
        why = "access denied"
    elif isinstance(error, FileNotFoundError):
        why = "not found"
    else:
        why = text[:200]
    return f"{path}: {why}"


def _checked(path: str | Path, call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 (botocore, aiohttp and gcsfs raise many unrelated types)
        raise UserError(describe_error(path, e)) from None


def check_reachable(path: str | Path) -> None:
    """Fail now, in one line, if `path`'s store cannot be reached (credentials, endpoint, bucket)."""
    name = scheme(path)
    if not name:
        return
    fs, inner = filesystem(path)
    bucket = inner.split("/", 1)[0]
    try:
        fs.ls(bucket, detail=False)  # `exists` would turn credential and connection errors into False
    except FileNotFoundError:
        raise UserError(f"{path}: bucket {bucket} does not exist or is not visible with these credentials") from None
    except Exception as e:  # noqa: BLE001 (botocore, aiohttp and gcsfs raise many unrelated types)
        raise UserError(describe_error(path, e)) from None


def exists(path: str | Path) -> bool:
    fs, inner = filesystem(path)
    return bool(_checked(path, fs.exists, inner))


def read_bytes(path: str | Path, start: int | None = None, end: int | None = None) -> bytes:
    fs, inner = filesystem(path)
    if not is_remote(path):
        with open(inner, "rb") as f:  # a local read needs no fsspec round trip
            f.seek(start or 0)
            return f.read() if end is None else f.read(end - (start or 0))
    return _checked(path, fs.cat_file, inner, start=start, end=end)


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `path` whole: locally through a temp sibling and rename, remotely as one PUT."""
    if not is_remote(path):
        target = local_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        from anychip.files import atomic_file

        with atomic_file(target) as tmp:
            tmp.write_bytes(data)
        return
    fs, inner = filesystem(path)
    _checked(path, fs.pipe_file, inner, data)


def write_text(path: str | Path, text: str) -> None:
    if not is_remote(path):
        local_path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(local_path(path), text)
    else:
        write_bytes(path, text.encode("utf-8"))


def size(path: str | Path) -> int:
    fs, inner = filesystem(path)
    return int(_checked(path, fs.size, inner))


def listdir(path: str | Path) -> list[str]:
    """Names (not paths) directly inside `path`; [] if it does not exist."""
    fs, inner = filesystem(path)
    if not _checked(path, fs.exists, inner):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in _checked(path, fs.ls, inner, detail=False))


def remove_tree(path: str | Path) -> None:
    fs, inner = filesystem(path)
    if _checked(path, fs.exists, inner):
        _checked(path, fs.rm, inner, recursive=True)


def as_url(fs_path: str, like: str | Path) -> str:
    """A path returned by fsspec (no scheme) as a URL with `like`'s scheme (or a local path)."""
    name = scheme(like)
    return f"{name}://{fs_path}" if name else fs_path


def open_output(path: str | Path) -> Any:
    """A binary file to stream into; remotely a multipart upload that becomes visible whole on close."""
    if not is_remote(path):
        return open(local_path(path), "wb")
    fs, inner = filesystem(path)
    return _checked(path, fs.open, inner, "wb")


def check_new_folder(path: str | Path) -> None:
    """An output folder (local or URL) must not exist yet, or be empty: nothing of the user's is replaced."""
    if not is_remote(path):
        from anychip.files import check_new_directory

        check_new_directory(local_path(path))
        return
    check_reachable(path)
    if listdir(path):
        raise UserError(f"{path} already exists and is not empty; choose a new prefix (nothing was changed)")


def upload_folder(local: Path, url: str, last: str) -> None:
    """Every file under `local` to `url`/..., the file named `last` after all the others: a reader that
    takes `last` as the folder's marker never sees it incomplete. A failure removes what was uploaded."""
    fs, inner = filesystem(url)
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.relative_to(local).as_posix() == last)
    try:
        for path in files:
            _checked(url, fs.put_file, str(path), f"{inner}/{path.relative_to(local).as_posix()}")
    except BaseException:  # also Ctrl-C and SIGTERM: leave no folder without its marker
        with contextlib.suppress(Exception):
            fs.rm(inner, recursive=True)
        raise


def download_files(url: str, names: list[str], local: Path) -> None:
    """`url`/name → `local`/name for each of `names` (plain names of files directly inside `url`)."""
    fs, inner = filesystem(url)
    local.mkdir(parents=True, exist_ok=True)
    for name in names:
        _checked(join(url, name), fs.get_file, f"{inner}/{name}", str(local / name))

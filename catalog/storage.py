"""Object storage by fsspec URL (``file://``, ``s3://``, ...), atomic writes, safe messages.

S3 settings come from the usual AWS variables and profiles (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_REGION``); an S3-compatible store is
selected with ``AWS_ENDPOINT_URL`` (read by botocore, hence s3fs) or an explicit
:class:`StorageConfig`. :func:`gdal_env` gives GDAL (rasterio) the same endpoint.

A user-visible object is never seen half-written: :func:`atomic_write` writes to a
temporary key next to the target and moves it into place when complete (one PUT on S3,
which is atomic; ``os.replace`` locally). Multi-object products (Zarr stores) commit by
writing their completion marker last instead (see ``relaymap.ingest.store``).

This module is the one storage layer of relaymap (``ingest`` uses it too).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict


class StorageError(OSError):
    """A storage location cannot be read or written (message names the URL, no secrets)."""


class UnsafeIdError(ValueError):
    """An id (from a STAC API, a config) that cannot become part of a path or URL."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What object stores raise for a bad endpoint or request: OS errors, and botocore's
    own (``EndpointConnectionError`` is not an ``OSError``)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # no S3 support installed
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


TRANSPORT_ERRORS = _transport_errors()


class StorageConfig(BaseModel):
    """Explicit S3 settings, overriding the environment where set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: e.g. ``http://127.0.0.1:8333`` for a local S3-compatible server.
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None

    def apply(self) -> None:
        """Export the settings as the standard AWS variables for this process and its
        children (boto, s3fs, GDAL via :func:`gdal_env`, Ray workers)."""
        for key, value in (
            ("AWS_ENDPOINT_URL", self.endpoint_url),
            ("AWS_REGION", self.region),
            ("AWS_PROFILE", self.profile),
        ):
            if value:
                os.environ[key] = value


_SECRET = re.compile(
    r"(?i)(aws_secret_access_key|aws_session_token|secret|password|token|key_id|\bsig)"
    r"(['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}&]+"
)


#: What an id must look like before it becomes part of a path or URL: no separators, no
#: ``..``, no percent-escapes, ASCII only, at most 128 characters.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_id(value: str, what: str = "id") -> str:
    """``value`` if it is safe as one path segment or URL segment (:data:`ID_PATTERN`,
    without ``..``); ids come from STAC APIs and configs, untrusted.

    Raises:
        UnsafeIdError: naming the bad id and what it was for.
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value) or ".." in value:
        raise UnsafeIdError(
            f"{what} {value!r} is not a safe id: use 1-128 ASCII letters, digits, '.', '_' "
            f"or '-', starting with a letter or digit, without '..'"
        )
    return value


def redact(text: str) -> str:
    """Remove credential values (and this process's AWS secrets) from a message."""
    text = _SECRET.sub(r"\1\2***", text)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def normalize_url(url: str | os.PathLike) -> str:
    """A plain path becomes an absolute ``file://`` URL; URLs are kept."""
    url = os.fspath(url)
    if "://" in url:
        return url.rstrip("/") if not url.endswith(":///") else url
    return "file://" + os.path.abspath(url)


def s3_options() -> dict[str, Any]:
    """s3fs options from the environment. Passing endpoint and credentials explicitly makes
    them part of fsspec's instance-cache key (a hash), so a changed environment gets a new
    client; they are never logged."""
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    for var, opt in (
        ("AWS_ACCESS_KEY_ID", "key"),
        ("AWS_SECRET_ACCESS_KEY", "secret"),
        ("AWS_SESSION_TOKEN", "token"),
    ):
        if os.environ.get(var):
            opts[opt] = os.environ[var]
    return opts


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for a URL; S3 options come from the environment."""
    url = normalize_url(url)
    opts = s3_options() if url.startswith(("s3://", "s3a://")) else {}
    return fsspec.url_to_fs(url, **opts)


def is_local(url: str) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def native(url: str) -> str:
    """The form libraries want: a plain path for local files, the URL otherwise (zarr's
    local store creates folders, its fsspec store does not)."""
    url = normalize_url(url)
    return url.removeprefix("file://") if url.startswith("file://") else url


def join(url: str, *parts: str) -> str:
    """Join URL path parts with ``/``."""
    return "/".join([normalize_url(url).rstrip("/"), *(p.strip("/") for p in parts)])


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    try:
        return fs.exists(path)
    except TRANSPORT_ERRORS as e:
        raise StorageError(f"cannot reach {url}: {redact(str(e))}") from None


def check_writable(url: str) -> None:
    """Fail now, naming ``url``, if nothing can be written under it: before any compute,
    and without leaving anything behind (a local folder is not even created).

    Raises:
        StorageError: the location is under a file, read-only, or unreachable.
    """
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        folder = path
        while not os.path.exists(folder):  # the nearest folder that exists
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise StorageError(f"cannot write {url}: {folder} is a file, not a folder")
        try:  # os.access says yes to root on read-only file systems: try it
            fd, probe = tempfile.mkstemp(prefix=".relaymap-write-check-", dir=folder)
        except OSError as e:
            raise StorageError(f"cannot write {url}: {e.strerror} ({folder})") from None
        os.close(fd)
        os.remove(probe)
        return
    probe = f"{path.rstrip('/')}/.relaymap-write-check-{uuid.uuid4().hex[:12]}"
    try:
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except TRANSPORT_ERRORS as e:
        raise StorageError(f"cannot write {url}: {redact(str(e))}") from None


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no object at {url}") from None
    except TRANSPORT_ERRORS as e:
        raise StorageError(f"cannot read {url}: {redact(str(e))}") from None


def _tmp_sibling(path: str) -> str:
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}.tmp-{uuid.uuid4().hex[:12]}"


#: Temporary siblings of :func:`atomic_write` / :func:`atomic_upload`.
TMP_SIBLING = re.compile(r"\..+\.tmp-[0-9a-f]{12}")
#: A temporary sibling older than this was left by a process that died (a write in flight
#: takes seconds, not an hour).
STALE_TMP_S = 3600.0


def remove_stale_temporaries(folder_url: str, older_than_s: float = STALE_TMP_S) -> list[str]:
    """Remove temporary siblings in ``folder_url`` left by killed writers (only names of
    our own pattern, only old ones: a live writer's are young); the paths removed."""
    fs, path = filesystem(folder_url)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    now, gone = time.time(), []
    for entry in fs.ls(path, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "file" or not TMP_SIBLING.fullmatch(name):
            continue
        modified = entry.get("mtime") or entry.get("LastModified") or entry.get("created")
        if hasattr(modified, "timestamp"):
            modified = modified.timestamp()
        if modified is not None and now - float(modified) > older_than_s:
            fs.rm(entry["name"])
            gone.append(entry["name"])
    return gone


def atomic_write(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that readers see the old object or the new, never a
    partial one (temporary sibling key, then a move)."""
    fs, path = filesystem(url)
    tmp = _tmp_sibling(path)
    try:
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(path.rpartition("/")[0], exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, data)  # one PUT: S3 never shows a partial object
    except TRANSPORT_ERRORS as e:
        if isinstance(fs, LocalFileSystem):
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise StorageError(f"cannot write {url}: {redact(str(e))}") from None


@contextlib.contextmanager
def atomic_upload(url: str, suffix: str = "") -> Iterator[str]:
    """Yield a local temporary file path; on success its content becomes ``url``.

    For writers that need a real file (GDAL, rasterio). On error nothing appears at
    ``url`` and the temporary file is removed.
    """

    fs, path = filesystem(url)
    local = isinstance(fs, LocalFileSystem)
    if local:
        fs.makedirs(path.rpartition("/")[0], exist_ok=True)
        tmp = _tmp_sibling(path) + suffix
    else:
        fd, tmp = tempfile.mkstemp(suffix=suffix)
        os.close(fd)
    try:
        yield tmp
        if local:
            os.replace(tmp, path)
        else:
            tmp_key = _tmp_sibling(path)
            fs.put_file(tmp, tmp_key)
            fs.mv(tmp_key, path)
    except TRANSPORT_ERRORS as e:
        raise StorageError(f"cannot write {url}: {redact(str(e))}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def remove(url: str, *, recursive: bool = False) -> None:
    """Delete an object (or a prefix with ``recursive``); missing is fine."""
    fs, path = filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=recursive)


def gdal_env() -> dict[str, Any]:
    """GDAL options matching the AWS environment, for ``rasterio.Env(**gdal_env())``.

    GDAL does not read ``AWS_ENDPOINT_URL``; an S3-compatible endpoint is passed as
    ``AWS_S3_ENDPOINT`` (host:port) with path-style addressing and the URL's scheme.
    """
    opts: dict[str, Any] = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else "https://" + endpoint)
        opts.update(
            AWS_S3_ENDPOINT=parsed.netloc,
            AWS_VIRTUAL_HOSTING="FALSE",
            AWS_HTTPS="YES" if parsed.scheme == "https" else "NO",
        )
    return opts

"""Where pretrained weights come from: a path, a URL, the Hugging Face Hub, a timm name or a
STAC MLM item, each fetched once into the Hugging Face cache and checked as far as its
source allows.

Publishers hand out weights differently. timm publishes ``NAME.TAG`` on the Hub as the
repository ``timm/NAME.TAG`` with a ``model.safetensors`` (older repositories: only
``pytorch_model.bin``); the Hub pins commits and names every LFS file by its SHA-256 (its
``X-Linked-Etag``), but ``huggingface_hub`` checks only a download's size. An object store
or a web server hands out a file with nothing to check it against. An MLM item (what
``relaymap pretrain`` writes) names its weights asset (role ``mlm:model``) and may carry its
``file:checksum``. A :class:`WeightsScheme` declares, as data, how one kind of reference is
recognised and where its file comes from; :func:`parse_source` turns a ``pretrained`` string
into a :class:`WeightsSource` without any I/O, and :func:`fetch_weights` makes it a local
file, verified.

Caches (folders read from the environment on every call, with huggingface_hub's precedence,
so ``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_ASSETS_CACHE`` are honoured as the library
honours them; see :func:`hub_cache` and :func:`url_cache`):

* Hub files: huggingface_hub's own cache (``$HF_HUB_CACHE``, default ``$HF_HOME/hub``),
  written by ``hf_hub_download``: ``models--ORG--NAME/snapshots/<commit>/model.safetensors``.
* Other remote URLs (``s3://``, ``https://`` ...): ``$HF_ASSETS_CACHE/relaymap/urls/<key>/
  <file name>`` (default ``$HF_HOME/assets``: huggingface_hub's folder for files a library
  caches itself), ``<key>`` the first 16 hex digits of the SHA-256 of the URL (and of the
  expected checksum, for an MLM asset); written to a temporary file, verified, then renamed.
* Local paths and ``file://`` URLs are read in place; an MLM item is read on every use (it
  is small, and it may be replaced); its asset is fetched as any other URL.

A cached file is used without any request: a Hub branch such as ``main`` is not re-checked
(pin ``@REVISION`` to choose one; delete the cache folder to fetch again).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: Files a Hub repository may hold a checkpoint in, in the order they are tried (timm's).
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
#: Multihash codes of ``file:checksum`` (hex) that can be verified: code -> hashlib name.
MULTIHASH = {"12": "sha256", "13": "sha512"}
#: A Hub ETag that is the file's SHA-256 (LFS files); other ETags are git hashes.
SHA256_ETAG = re.compile(r"[0-9a-f]{64}")


class WeightsError(ValueError):
    """Pretrained weights that cannot be used: the message names the source and what to do."""


class WeightsNotFound(WeightsError, FileNotFoundError):
    """Weights neither at their source (missing or unreachable) nor in the cache."""


class ChecksumMismatch(WeightsError):
    """A file whose digest is not the one its source publishes (it is not kept)."""


@dataclass(frozen=True)
class WeightsScheme:
    """How one kind of ``pretrained`` reference is recognised and fetched."""

    name: str
    #: Matches the whole reference; its named groups (``repo``, ``revision``, ``url``) fill
    #: the :class:`WeightsSource`.
    pattern: re.Pattern[str]
    #: ``hub``: a Hub repository (``hf_hub_download``); ``url``: a path or fsspec URL;
    #: ``item``: an MLM item whose model asset is fetched in turn.
    fetch: Literal["hub", "url", "item"]
    #: Hub organisation a bare name is published under (timm: ``NAME.TAG`` ->
    #: ``timm/NAME.TAG``).
    org: str | None = None


#: Reference kinds, tried in order; the last matches anything (a path or URL).
SCHEMES: tuple[WeightsScheme, ...] = (
    WeightsScheme(
        "hf-hub",
        re.compile(r"hf-hub:(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?"),
        "hub",
    ),
    WeightsScheme("mlm-item", re.compile(r"(?P<url>.+\.json)", re.IGNORECASE), "item"),
    # timm's NAME.TAG, e.g. swinv2_tiny_window8_256.ms_in1k; a file name is not a tag
    WeightsScheme(
        "timm",
        re.compile(r"(?P<repo>[a-z0-9_]+\.(?!(?:safetensors|pth|pt|bin|ckpt)$)[a-z0-9_]+)"),
        "hub",
        org="timm",
    ),
    WeightsScheme("url", re.compile(r"(?P<url>.+)"), "url"),
)


@dataclass(frozen=True)
class WeightsSource:
    """A parsed ``pretrained`` reference: where its file is, before anything is read."""

    #: The reference as written (for messages).
    ref: str
    scheme: WeightsScheme
    #: Hub repository id and revision (``None``: ``main``).
    repo: str | None = None
    revision: str | None = None
    #: Path or fsspec URL (``url`` and ``item`` schemes).
    url: str | None = None


def parse_source(ref: str | os.PathLike) -> WeightsSource:
    """The :class:`WeightsSource` a ``pretrained`` reference names (no I/O but one ``stat``:
    a reference that is an existing local file is that file, whatever it looks like)."""
    text = os.fspath(ref)
    for scheme in SCHEMES:
        m = scheme.pattern.fullmatch(text)
        if m is None or (scheme.org and os.path.exists(text)):
            continue
        groups = m.groupdict()
        repo = groups.get("repo")
        if repo and scheme.org:
            repo = f"{scheme.org}/{repo}"
        return WeightsSource(text, scheme, repo, groups.get("revision"), groups.get("url"))
    raise AssertionError("the last scheme matches any reference")


def absolute(ref: str | os.PathLike) -> str:
    """``ref`` as another process on this machine reads it (Ray workers run in a working
    directory of their own): a relative path, of weights or of an MLM item, made absolute;
    Hub names and URLs as they are."""
    source = parse_source(ref)
    if source.url is None or "://" in source.url:
        return source.ref
    return os.path.abspath(source.url)


def fetch_weights(ref: str | os.PathLike) -> Path:
    """A local file holding the weights ``ref`` names, fetched and verified once.

    Raises:
        WeightsNotFound: missing or unreachable and not cached (the message names the
            source, the cache folder and how to place the file there by hand).
        ChecksumMismatch: the file's digest is not the published one (naming both).
        WeightsError: an MLM item without a usable model asset.
    """
    source = parse_source(ref)
    if source.scheme.fetch == "hub":
        return _fetch_hub(source)
    if source.scheme.fetch == "item":
        return _fetch_item(source)
    return _fetch_url(source.url or source.ref, source.ref)


def _first_line(e: BaseException) -> str:
    """An error's first non-empty line (library errors span many)."""
    return next((s.strip() for s in str(e).splitlines() if s.strip()), type(e).__name__)


# ---------------------------------------------------------------- cache folders


def _env_path(*names: str, default: str) -> str:
    value = next((os.environ[n] for n in names if os.environ.get(n)), default)
    return os.path.expandvars(os.path.expanduser(value))


def _hf_home() -> str:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return _env_path("HF_HOME", default=os.path.join(xdg, "huggingface"))


def hub_cache() -> Path:
    """huggingface_hub's cache of Hub files: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``
    (huggingface_hub reads these once at import; they are read here on every call)."""
    return Path(
        _env_path("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", default=os.path.join(_hf_home(), "hub"))
    )


def url_cache() -> Path:
    """Where remote URLs are cached: ``relaymap/urls`` in huggingface_hub's assets cache
    (``HF_ASSETS_CACHE``, else ``$HF_HOME/assets``; see ``huggingface_hub.cached_assets_path``)."""
    assets = _env_path(
        "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE", default=os.path.join(_hf_home(), "assets")
    )
    return Path(assets, "relaymap", "urls")


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


# ---------------------------------------------------------------- verification


def _check(path: Path, algorithm: str, expected: str, what: str) -> None:
    """Raise :class:`ChecksumMismatch` (naming ``what`` and both digests) unless the file's
    ``algorithm`` digest is ``expected`` (hex)."""
    with open(path, "rb") as f:
        got = hashlib.file_digest(f, algorithm).hexdigest()
    if got != expected.lower():
        raise ChecksumMismatch(
            f"{what}: the file's {algorithm} is {got} but its source publishes "
            f"{expected.lower()} (a corrupted transfer or a replaced file; a download is not "
            f"kept in the cache)"
        )


def _multihash(value: str, where: str) -> tuple[str, str]:
    """``(hashlib name, hex digest)`` of a ``file:checksum`` multihash (hex string)."""
    code, size, digest = value[:2], value[2:4], value[4:]
    if not re.fullmatch(r"[0-9a-fA-F]{6,}", value) or len(digest) != 2 * int(size, 16):
        raise WeightsError(f"{where}: file:checksum {value!r} is not a hex multihash")
    if code not in MULTIHASH:
        raise WeightsError(
            f"{where}: file:checksum {value!r} uses multihash code 0x{code}; relaymap verifies "
            + ", ".join(f"{name} (0x{c})" for c, name in MULTIHASH.items())
        )
    return MULTIHASH[code], digest


# ---------------------------------------------------------------- the Hub


def _fetch_hub(source: WeightsSource) -> Path:
    """The first of :data:`HUB_FILES` the repository has: from the cache without a request,
    else downloaded by ``hf_hub_download`` and checked against its LFS SHA-256."""
    import httpx2  # huggingface_hub's HTTP client: its errors mean an unreachable Hub
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub import try_to_load_from_cache as cached
    from huggingface_hub.errors import (
        HFValidationError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision, cache = source.repo or "", source.revision or "main", hub_cache()
    try:
        for name in HUB_FILES:
            hit = cached(repo, name, cache_dir=cache, revision=revision)
            if isinstance(hit, str):  # (a cached "does not exist" is not a hit)
                return Path(hit)
        endpoint = _endpoint()
        for name in HUB_FILES:
            url = hf_hub_url(repo, name, revision=revision, endpoint=endpoint)
            try:
                meta = get_hf_file_metadata(url, endpoint=endpoint)  # one HEAD, no retries
            except RemoteEntryNotFoundError:
                continue
            path = Path(
                hf_hub_download(repo, name, revision=revision, cache_dir=cache, endpoint=endpoint)
            )
            blob = Path(os.path.realpath(path))  # blobs/<etag>, where symlinks work
            etag = blob.name if blob.parent.name == "blobs" else (meta.etag or "")
            if SHA256_ETAG.fullmatch(etag):
                try:
                    _check(path, "sha256", etag, f"{source.ref} ({repo}@{revision}/{name})")
                except ChecksumMismatch:
                    _drop_from_hub_cache(path, blob)
                    raise
            return path
        reason = f"{repo}@{revision} has none of {', '.join(HUB_FILES)}"
    except RevisionNotFoundError:
        reason = f"{repo} has no revision {revision} on {_endpoint()}"
    except RepositoryNotFoundError:  # (or GatedRepoError, a subclass)
        reason = f"no repository {repo} on {_endpoint()} (a private or gated one needs a login)"
    except HFValidationError as e:
        raise WeightsError(f"{source.ref}: not a Hub repository id: {_first_line(e)}") from None
    except (OSError, httpx2.HTTPError) as e:  # includes HfHubHTTPError, offline mode
        reason = f"cannot reach {_endpoint()}: {type(e).__name__}: {_first_line(e)}"
    folder = cache / ("models--" + repo.replace("/", "--"))
    pin = f" --revision {revision}" if source.revision else ""
    raise WeightsNotFound(
        f"{source.ref}: {reason}; not in the cache folder {folder}; place it there with "
        f"`hf download {repo} {HUB_FILES[0]}{pin}` (same HF_HOME or HF_HUB_CACHE) on a "
        f"machine that reaches the Hub and copy that folder here, or pass a local file"
    )


def _drop_from_hub_cache(pointer: Path, blob: Path) -> None:
    """Remove a rejected download: its snapshot entry, its blob, an emptied snapshot."""
    for p in (pointer, blob):
        p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: other files of that commit stay
        pointer.parent.rmdir()


# ---------------------------------------------------------------- paths and URLs


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _fetch_url(url: str, ref: str, digest: tuple[str, str] | None = None) -> Path:
    """A local path as is (verified against ``digest`` if given); a remote URL from
    :func:`url_cache`, downloaded once (temporary file, verified, renamed)."""
    if _is_local(url):
        path = Path(url.removeprefix("file://"))
        if not path.is_file():
            hint = "" if re.search(r"[./\\]", ref) else "; a timm name needs its tag: NAME.TAG"
            raise WeightsNotFound(f"checkpoint not found: {ref} (no file {path}){hint}")
        if digest:
            _check(path, *digest, ref)
        return path
    key = hashlib.sha256("\n".join([url, *(digest or ())]).encode()).hexdigest()[:16]
    name = re.sub(r"[^\w.-]", "_", posixpath.basename(url.split("?")[0])).lstrip(".")
    path = url_cache() / key / (name or "weights")
    if path.is_file():
        return path
    new_dirs = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.incomplete")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _download(url, tmp, path, ref)
        if digest:
            _check(tmp, *digest, ref)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for d in new_dirs:  # deepest first: leave nothing behind
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return path


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What fsspec back ends raise for an unreachable or refusing server: OS errors (aiohttp's
    connection errors are), and botocore's and aiohttp's own."""
    errors: list[type[BaseException]] = [OSError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError as HttpClientError

        errors.append(HttpClientError)
    return tuple(errors)


def _download(url: str, tmp: Path, path: Path, ref: str) -> None:
    """``url`` into ``tmp``, or :class:`WeightsNotFound` saying how to place it at ``path``."""
    import fsspec

    try:
        fs, remote = fsspec.core.url_to_fs(url)
        fs.get_file(remote, str(tmp))
    except FileNotFoundError:
        reason = "no such file"
    except _transport_errors() as e:
        reason = f"cannot read it: {type(e).__name__}: {_first_line(e)}"
    else:
        return
    raise WeightsNotFound(
        f"{ref}: {reason}{f' at {url}' if url not in ref else ''}; not in the cache folder "
        f"{path.parent}; place the file there by hand as {path}, or pass a local file"
    )


# ---------------------------------------------------------------- MLM items


def _join(base: str, href: str) -> str:
    """``href`` resolved against the URL or path of the document that holds it."""
    if "://" in href or href.startswith("/"):
        return href
    scheme, sep, path = base.rpartition("://")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), href))
    return f"{scheme}{sep}{joined}" if sep else os.path.normpath(joined)


def _fetch_item(source: WeightsSource) -> Path:
    """The model asset of an MLM item: role ``mlm:model`` (else the asset ``weights``),
    fetched as a URL and verified against its ``file:checksum`` when it has one."""
    import fsspec

    url = source.url or source.ref
    try:
        with fsspec.open(url, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        raise WeightsNotFound(f"{source.ref}: no MLM item there") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{source.ref} is not JSON: {e}") from None
    except _transport_errors() as e:
        raise WeightsNotFound(
            f"{source.ref}: cannot read the MLM item: {type(e).__name__}: {_first_line(e)}"
        ) from None
    assets = doc.get("assets") if isinstance(doc, dict) else None
    if not isinstance(assets, dict):
        raise WeightsError(f"{source.ref} is not a STAC item (no assets)")
    models = [
        a for a in assets.values() if isinstance(a, dict) and "mlm:model" in (a.get("roles") or [])
    ]
    asset = models[0] if len(models) == 1 else None if models else assets.get("weights")
    href = asset.get("href") if isinstance(asset, dict) else None
    if not isinstance(href, str) or not href:
        raise WeightsError(
            f"{source.ref}: need one asset with role 'mlm:model' (or one named 'weights') "
            f"with an href; the item's assets: {sorted(assets)}"
        )
    checksum = asset.get("file:checksum")
    digest = _multihash(str(checksum), source.ref) if checksum else None
    target = _join(url, href)
    return _fetch_url(target, f"{source.ref} (asset {target})", digest)

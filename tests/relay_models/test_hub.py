"""Weights by name (issue 33, part 1): Hub names, timm names, URLs and MLM items, fetched once
into the Hugging Face cache, verified, and loaded strictly into every twin of a backbone.

The real ``huggingface_hub`` download code runs against :class:`StandInHub`, an HTTP server
on loopback that plays the Hugging Face Hub (``HF_ENDPOINT`` points at it): a fake for the
internet Hub, which tests never reach. It answers ``HEAD``/``GET
/{repo}/resolve/{revision}/{file}`` with the headers huggingface_hub 2.4 reads
(``file_download.get_hf_file_metadata``: ``X-Repo-Commit``, ``X-Linked-Etag``/``ETag``,
``X-Linked-Size``/``Content-Length``; 404s carry ``X-Error-Code``) and never ``X-Xet-Hash``,
so the plain HTTP download path runs, not Xet. It also serves plain files under ``/files/``
for URL sources, and records every request, so "read from the cache" is checked by counting.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
import yaml
from safetensors.torch import save, save_file

from relay_models import DataSpec, WeightsNotFound, create_model, load_pretrained
from relay_models.hub import ChecksumMismatch, url_cache
from relay_models.weights import NEW_KEY
from tests.relay_models.helpers import perturb_all

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


class StandInHub(ThreadingHTTPServer):
    """A stand-in for the Hugging Face Hub on loopback (a fake for the internet Hub)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        #: (repo, branch or tag) -> commit; a commit names itself.
        self.refs: dict[tuple[str, str], str] = {}
        #: commit -> {file name: bytes}.
        self.commits: dict[str, dict[str, bytes]] = {}
        #: (commit, file name) -> the LFS etag to publish instead of the file's SHA-256.
        self.bad_etags: dict[tuple[str, str], str] = {}
        #: plain files, by URL path (``/files/...``).
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []

    def publish(self, repo: str, commit: str, files: dict[str, bytes], *refs: str) -> None:
        self.commits[commit] = files
        for ref in (commit, *refs):
            self.refs[(repo, ref)] = commit

    def count(self, fragment: str) -> int:
        return sum(fragment in path for _, path in list(self.requests))


class _Handler(BaseHTTPRequestHandler):
    server: StandInHub

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def log_message(self, *args) -> None:
        pass

    def _serve(self, body: bool) -> None:
        hub = self.server
        hub.requests.append((self.command, self.path))
        path = unquote(urlparse(self.path).path)
        if path.startswith("/files/"):
            data = hub.files.get(path)
            return self._reply(404) if data is None else self._reply(200, data, body)
        m = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
        if m is None or not any(repo == m["repo"] for repo, _ in hub.refs):
            return self._reply(404, headers={"X-Error-Code": "RepoNotFound"})
        commit = hub.refs.get((m["repo"], m["rev"]))
        if commit is None:
            return self._reply(404, headers={"X-Error-Code": "RevisionNotFound"})
        data = hub.commits[commit].get(m["file"])
        if data is None:
            headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}
            return self._reply(404, headers=headers)
        etag = hub.bad_etags.get((commit, m["file"]), hashlib.sha256(data).hexdigest())
        headers = {
            "X-Repo-Commit": commit,
            "X-Linked-Etag": f'"{etag}"',
            "ETag": f'"{etag}"',
            "X-Linked-Size": str(len(data)),
        }
        self._reply(200, data, body, headers)

    def _reply(
        self, status: int, data: bytes = b"", body: bool = True, headers: dict | None = None
    ) -> None:
        self.send_response(status)
        for k, v in {**(headers or {}), "Content-Length": str(len(data))}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture(scope="module")
def hub() -> Iterator[StandInHub]:
    server = StandInHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def hf_home(tmp_path, monkeypatch, hub) -> Path:
    """A fresh Hugging Face cache for this test, and the stand-in as the Hub."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return home


def _nano_state(seed: int, name: str = "swinv2_nano") -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    backbone = perturb_all(create_model(name, num_classes=2), seed=seed).backbone
    return {k: v.contiguous() for k, v in backbone.state_dict().items()}


@pytest.fixture(scope="module")
def weights() -> dict[str, dict[str, torch.Tensor]]:
    """Two timm-format nano backbones, and a relay backbone's checkpoint (relay keys)."""
    return {
        "one": _nano_state(1),
        "two": _nano_state(2),
        "relay": _nano_state(3, "swinv2_nano_relay"),
    }


@pytest.fixture(scope="module")
def nano():
    """One sliding-window nano model that each load overwrites (every backbone key)."""
    return create_model("swinv2_nano", num_classes=2)


def _same(model, sd: dict[str, torch.Tensor]) -> bool:
    own = model.backbone.state_dict()
    return all(torch.equal(own[k], v) for k, v in sd.items() if k in own)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_hub_name_downloads_once_then_reads_the_cache(hub, hf_home, weights, nano):
    hub.publish("org/nano-once", COMMIT_A, {"model.safetensors": save(weights["one"])}, "main")
    model = create_model("swinv2_nano", num_classes=2, pretrained="hf-hub:org/nano-once")
    assert _same(model, weights["one"])
    assert ("GET", "/org/nano-once/resolve/main/model.safetensors") in hub.requests
    cached = hf_home / "hub/models--org--nano-once/snapshots" / COMMIT_A / "model.safetensors"
    assert cached.is_file()
    before = len(hub.requests)
    load_pretrained(nano, "hf-hub:org/nano-once")
    assert _same(nano, weights["one"])
    assert len(hub.requests) == before  # the cache, no request


def test_hub_timm_name_is_timm_org_and_falls_back_to_pytorch_model_bin(hub, hf_home, weights, nano):
    buf = io.BytesIO()
    torch.save(weights["two"], buf)
    name = "swinv2_tiny_window8_256.ms_in1k"
    hub.publish(f"timm/{name}", COMMIT_B, {"pytorch_model.bin": buf.getvalue()}, "main")
    load_pretrained(nano, name)
    assert _same(nano, weights["two"])
    assert hub.count(f"/timm/{name}/resolve/main/model.safetensors") == 1  # 404: next file
    assert ("GET", f"/timm/{name}/resolve/main/pytorch_model.bin") in hub.requests


def test_hub_revision_pinning(hub, hf_home, weights, nano):
    one, two = save(weights["one"]), save(weights["two"])
    hub.publish("org/pinned", COMMIT_A, {"model.safetensors": one}, "main")
    hub.publish("org/pinned", COMMIT_B, {"model.safetensors": two}, "v1")
    for ref, expected in [
        ("hf-hub:org/pinned@v1", "two"),
        ("hf-hub:org/pinned", "one"),
        (f"hf-hub:org/pinned@{COMMIT_B}", "two"),
        (f"hf-hub:org/pinned@{COMMIT_A}", "one"),
    ]:
        load_pretrained(nano, ref)
        assert _same(nano, weights[expected]), ref
    with pytest.raises(WeightsNotFound, match=r"hf-hub:org/pinned@v9: .*no revision v9"):
        load_pretrained(nano, "hf-hub:org/pinned@v9")


def test_hub_checksum_mismatch_is_refused_and_not_cached(hub, hf_home, weights, nano):
    data = save(weights["one"])
    published = hashlib.sha256(b"other bytes").hexdigest()
    hub.publish("org/tampered", COMMIT_A, {"model.safetensors": data}, "main")
    hub.bad_etags[(COMMIT_A, "model.safetensors")] = published
    for _ in range(2):  # refused each time: nothing was kept to be read back
        with pytest.raises(ChecksumMismatch) as e:
            load_pretrained(nano, "hf-hub:org/tampered")
        msg = str(e.value)
        assert "hf-hub:org/tampered" in msg and published in msg
        assert hashlib.sha256(data).hexdigest() in msg and "\n" not in msg
    assert hub.count("/org/tampered/resolve/main/model.safetensors") >= 4  # fetched twice
    folder = hf_home / "hub/models--org--tampered"
    assert not [p for p in _files(folder) if p.parent.name in ("blobs", COMMIT_A)]


def test_hub_missing_repository_is_one_line_naming_the_cache(hub, hf_home, nano):
    with pytest.raises(WeightsNotFound) as e:
        load_pretrained(nano, "hf-hub:org/absent")
    msg = str(e.value)
    assert msg.startswith("hf-hub:org/absent: no repository org/absent on ")
    assert str(hf_home / "hub" / "models--org--absent") in msg
    assert "hf download org/absent model.safetensors" in msg and "\n" not in msg
    assert _files(hf_home) == []


def test_hub_url_is_cached_once(hub, hf_home, weights, nano):
    hub.files["/files/nano.safetensors"] = save(weights["two"])
    url = f"{hub.url}/files/nano.safetensors"
    load_pretrained(nano, url)
    assert _same(nano, weights["two"])
    assert hub.count("/files/nano.safetensors") >= 1
    (cached,) = _files(url_cache())
    assert cached.name == "nano.safetensors"
    assert url_cache() == hf_home / "assets" / "relaymap" / "urls"
    before = len(hub.requests)
    load_pretrained(nano, url)
    assert _same(nano, weights["two"])
    assert len(hub.requests) == before
    missing = f"{hub.url}/files/absent.safetensors"
    with pytest.raises(WeightsNotFound, match=r"absent\.safetensors: no such file") as e:
        load_pretrained(nano, missing)
    assert str(url_cache()) in str(e.value) and "place the file there" in str(e.value)
    assert _files(url_cache()) == [cached]  # nothing left of the failed download


def test_hub_mlm_item_with_checksum(hub, hf_home, tmp_path, weights, nano):
    """An MLM item as relaymap writes it (``catalog.model_item``: role ``mlm:model``,
    ``file:checksum``) is followed to its weights, which are verified."""
    from relaymap.catalog import model_item

    path = tmp_path / "backbone.safetensors"
    save_file(weights["one"], path)
    spec = DataSpec.default(in_chans=3, num_classes=2, factor=None)
    item = model_item(
        str(path),
        item_id="nano-backbone",
        collection="models",
        spec=spec,
        model_name="swinv2_nano",
        architecture="SwinTransformerV2",
        total_parameters=1,
    ).to_dict()
    local = tmp_path / "nano-backbone.json"
    local.write_text(json.dumps(item))
    load_pretrained(nano, local)
    assert _same(nano, weights["one"])
    # the same weights behind an http href (relative to the item): cached once, verified
    hub.files["/files/models/backbone.safetensors"] = path.read_bytes()
    item["assets"]["weights"]["href"] = "./backbone.safetensors"
    hub.files["/files/models/item.json"] = json.dumps(item).encode()
    remote = f"{hub.url}/files/models/item.json"
    load_pretrained(nano, remote)
    assert _same(nano, weights["one"])
    assert hub.count("/files/models/backbone.safetensors") >= 1
    before = hub.count("/files/models/backbone.safetensors")
    load_pretrained(nano, remote)
    assert hub.count("/files/models/backbone.safetensors") == before
    # a checksum that is not the file's: refused, naming both digests, nothing cached
    real = item["assets"]["weights"]["file:checksum"]
    wrong = "1220" + hashlib.sha256(b"other bytes").hexdigest()
    item["assets"]["weights"]["file:checksum"] = wrong
    hub.files["/files/models/item.json"] = json.dumps(item).encode()
    cached = _files(url_cache())
    with pytest.raises(ChecksumMismatch) as e:
        load_pretrained(nano, remote)
    assert wrong[4:] in str(e.value) and real[4:] in str(e.value) and remote in str(e.value)
    assert _files(url_cache()) == cached


@pytest.mark.parametrize(
    "name",
    [
        "swinv2_nano_relay",
        "swinv2_nano_relayfusion",
        "swinv2_nano_registers",
        "swinv2_nano",
        "swinv2_nano_fusion",
        "swinv2_nano_downsample",
    ],
)
def test_hub_relay_backbone_checkpoint_loads_into_every_twin(tmp_path, weights, name):
    """relaymap's own backbone checkpoints (relay keys included) fit every twin: a model
    uses the relay keys it has and reports the others as unused."""
    sd = weights["relay"]
    path = tmp_path / "relay-backbone.safetensors"
    save_file(sd, path)
    model = create_model(name, num_classes=2)
    report = load_pretrained(model, path)
    assert _same(model, sd)
    relay_keys = {k for k in sd if NEW_KEY.match(k)}
    assert relay_keys and {"relay_tokens", "patch_embed_global.proj.weight"} <= relay_keys
    own = set(model.backbone.state_dict())
    assert set(report.unused) == relay_keys - own and report.initialised == ()
    if name.endswith(("_relay", "_relayfusion")):
        assert report.unused == ()
    elif not name.endswith("_registers"):
        assert set(report.unused) == relay_keys
    assert report.loaded == len(model.backbone.state_dict())
    first, second = report.summary().splitlines()
    assert f"{report.loaded} backbone tensors loaded, 0 new left at init" in first
    assert second.startswith(f"unused checkpoint keys: {len(report.unused)}")


def test_hub_unreachable_through_the_cli_is_one_line_exit_2(tmp_path):
    """``relaymap train --pretrained`` with the Hub down: exit 2, one line on stderr naming
    the source and the cache folder, nothing written, before any store is opened."""
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "name": "swinv2_nano_relay",
                    "num_classes": 2,
                    "in_chans": 3,
                    "pretrained": "overridden-by-the-flag.safetensors",
                },
                "data": {"train": [str(tmp_path / "no-such-store.zarr")]},
                "run": {"storage_url": str(tmp_path / "runs")},
            }
        )
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": down}
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE"):
        env.pop(var, None)
    run = subprocess.run(
        ["relaymap", "train", str(config), "--pretrained", "hf-hub:org/nano"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "Traceback" not in run.stderr and "hf-hub:org/nano: cannot reach" in lines[0]
    assert str(tmp_path / "hf" / "hub" / "models--org--nano") in lines[0]
    assert "hf download org/nano model.safetensors" in lines[0]
    assert _files(tmp_path / "hf") == [] and not (tmp_path / "runs").exists()

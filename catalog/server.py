"""A local STAC API on loopback (``rustac serve``) for the demo and the tests."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

import pystac


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout_s: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 2xx; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


@contextlib.contextmanager
def serve_stac(
    collections: Iterable[pystac.Collection], items: Iterable[pystac.Item] = ()
) -> Iterator[str]:
    """Serve collections and items as a STAC API on loopback; yield its root URL.

    Items of each collection are served too. The data is held in memory by ``rustac
    serve`` (read-only: search, bbox/datetime/intersects/collections filters, paging).
    """
    exe = shutil.which("rustac")
    if exe is None:
        raise FileNotFoundError("rustac is not installed (pip install rustac)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="relaymap-stac-") as tmp:
        hrefs, all_items = [], list(items)
        for c in collections:
            d = c.to_dict(include_self_link=False, transform_hrefs=False)
            d["links"] = [ln for ln in d["links"] if ln["rel"] not in ("item", "root", "child")]
            path = Path(tmp, f"collection-{c.id}.json")
            path.write_text(json.dumps(d))
            hrefs.append(str(path))
            all_items.extend(c.get_items(recursive=True))
        unique = {(it.collection_id, it.id): it for it in all_items}
        if unique:
            path = Path(tmp, "items.ndjson")
            path.write_text(
                "\n".join(
                    json.dumps(
                        {
                            k: v
                            for k, v in it.to_dict(
                                include_self_link=False, transform_hrefs=False
                            ).items()
                            if k != "links"
                        }
                    )
                    for it in unique.values()
                )
            )
            hrefs.append(str(path))
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [exe, "serve", "--addr", f"127.0.0.1:{port}", "--create-collections", *hrefs],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for_http(url, proc=proc)
            yield url
        finally:
            proc.kill()
            proc.wait(timeout=10)

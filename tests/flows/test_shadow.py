"""Run from a folder that holds packages named like ours (any checkout of a project with a
``relay_models/`` or ``relaymap/`` folder), a real Ray job still runs our code: Ray workers
do not get the driver's working directory on ``sys.path``. Checked for the editable install
the tests run in and for a wheel installed into a virtual environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relaymap.catalog import serve_stac

from .area_data import CELL, area_geojson, make_source

ROOT = Path(__file__).resolve().parents[2]
#: Top-level names a working directory could shadow: our packages and our folders.
SHADOWED = ("relay_models", "relaymap", "catalog", "ingest", "flows")


@pytest.fixture(scope="module")
def shadowing_folder(tmp_path_factory) -> Path:
    """A folder whose packages named like ours fail on import."""
    folder = tmp_path_factory.mktemp("checkout-of-another-project")
    for name in SHADOWED:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(
            f"raise ImportError('the {name}/ folder of the working directory was imported')\n"
        )
    return folder


@pytest.fixture(scope="module")
def area_source(tmp_path_factory, scenes):
    root = tmp_path_factory.mktemp("shadow-source")
    col = make_source(str(root / "source"), seed=11)
    with serve_stac([col]) as api:
        yield {"api": api, "collection": col.id, "model": scenes["model"]}


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    """relaymap built as a wheel and installed (not editable) into a virtual environment
    that sees this one's dependencies; its ``bin`` folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools writes build/ and *.egg-info next to the sources
    skip = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "relaymap-*", "tests")
    shutil.copytree(ROOT, tmp / "src", ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(tmp / "dist"), str(tmp / "src")],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = (tmp / "dist").glob("relaymap-*.whl")
    venv = tmp / "venv"
    # no pip of its own (ensurepip takes seconds): this environment's pip installs into it
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
        timeout=300,
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
         "install", "--no-deps", str(wheel)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return venv / "bin"


def _where_installed(bin_dir: Path, cwd: Path) -> list[str]:
    """Where that environment's Python finds our packages, run from ``cwd``: the files an
    import would run (found, not run: importing relay_models costs seconds of torch)."""
    code = "from importlib.util import find_spec as f; " + (
        "print(f('relay_models').origin); print(f('relaymap.flows').origin)"
    )
    out = subprocess.run(
        [str(bin_dir / "python"), "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        # python -c puts the working directory first on sys.path: drop it, as a script does
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    return out.stdout.split()


def _map_from(bin_dir: Path, cwd: Path, src: dict, out: Path) -> subprocess.CompletedProcess:
    # the area as one cell, one model actor: an actor's worker maps it and a task's worker
    # makes its imagery product, both running our code
    return subprocess.run(
        [str(bin_dir / "relaymap"), "map", "--area", area_geojson(), "--period", "2026-01",
         "--model", src["model"], "--source", src["api"], "--collection", src["collection"],
         "--out", str(out), "--cell-px", str(2 * CELL), "--workers", "1"],
        cwd=cwd, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("install", ["editable", "wheel"])
def test_a_shadow_folder_in_the_working_directory_does_not_replace_our_code_in_ray_workers(
    install, shadowing_folder, area_source, tmp_path, request
):
    bin_dir = (
        Path(sys.executable).parent
        if install == "editable"
        else request.getfixturevalue("wheel_env")
    )
    found = _where_installed(bin_dir, shadowing_folder)
    assert not any(f.startswith(str(shadowing_folder)) for f in found), found
    if install == "wheel":  # the wheel's copy, not this checkout
        assert all("site-packages" in f and not f.startswith(str(ROOT)) for f in found), found
    run = _map_from(bin_dir, shadowing_folder, area_source, tmp_path / "out")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "1 cells x 1 periods: 1 mapped" in run.stdout and "0 failed" in run.stdout, run.stdout
    assert "folder of the working directory was imported" not in run.stdout + run.stderr
    assert list((tmp_path / "out").rglob("imagery/*.tif"))  # a task's worker made it

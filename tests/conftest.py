"""Shared fixtures."""

from __future__ import annotations

import os

# Waiting OpenMP threads spin briefly, then sleep (the results are the same). Torch runs a
# thread per core in the test process; with libgomp's default, waiting threads spin so long
# that with another process busy on one of 2 cores every parallel region waits for the
# descheduled thread (a training step 7x slower; always spinning, the change module 5x).
# Sleeping at once doubles a step's time on idle cores; a 10000-iteration spin first was the
# measured balance (bench/omp_wait.py, docs/testing.md). libgomp reads both as torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import importlib

import pytest
import torch
from hypothesis import settings

# CI machines are shared: a property test must not fail because an example was slow
settings.register_profile("relaymap", deadline=None)
settings.load_profile("relaymap")


@pytest.fixture(scope="session")
def timm():
    """timm, importable here although there is no CPU torchvision.

    The registry's torchvision is a CUDA build whose ops library fails to load with CPU torch;
    its Python side then registers fake kernels for ``torchvision::nms``/``qnms`` and fails
    because the schemas are missing. Defining the two schemas first lets ``import timm`` work
    (timm's models never call those ops). Only the tests import timm.
    """
    lib = torch.library.Library("torchvision", "DEF")  # kept alive by the fixture frame
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    module = importlib.import_module("timm")
    yield module


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server (SeaweedFS) for the session, with the standard AWS
    variables pointing at it while the tests run."""
    from tests.services import environ, seaweedfs

    with seaweedfs(buckets=("relaymap-test",)) as server, environ(server.env()):
        yield server


@pytest.fixture(scope="session")
def sample_local(tmp_path_factory):
    """Three 256 px sample scenes (COGs + STAC JSON) in a local folder."""
    from relaymap.ingest import make_sample_scenes

    root = tmp_path_factory.mktemp("sample")
    return make_sample_scenes(str(root), n_scenes=3, size_px=256, feature_px=32, seed=1)


@pytest.fixture(scope="session")
def sample_s3(s3):
    """The same sample scenes on the S3 server."""
    from relaymap.ingest import make_sample_scenes

    return make_sample_scenes(
        "s3://relaymap-test/sample", n_scenes=3, size_px=256, feature_px=32, seed=1
    )


@pytest.fixture(scope="session")
def stac_api(sample_s3):
    """``rustac serve`` over the S3 sample collection; yields the API URL."""
    from relaymap.catalog import serve_stac

    with serve_stac([sample_s3]) as url:
        yield url

"""Fixtures of the flow tests: local Ray, sample scene stores and a quickly trained model."""

from __future__ import annotations

import pytest

from .models import quick_model

BANDS = ["blue", "green", "red", "nir"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.shutdown()
    # "local": a new instance, never a cluster another process's `ray start` left on the machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def scenes(tmp_path_factory):
    """Two 640 px sample scenes (one with a nodata corner) as stores, and a model trained for
    a few steps on the first."""
    from relaymap.ingest import ingest_items, make_sample_scenes

    root = tmp_path_factory.mktemp("infer")
    col = make_sample_scenes(str(root / "sample"), n_scenes=2, size_px=640, feature_px=48, seed=3)
    items = list(col.get_items())
    stores = [ingest_items([it], str(root / f"{it.id}.zarr"), BANDS).url for it in items]
    model = quick_model(stores[0], str(root / "model.safetensors"), steps=4)
    return {"root": root, "items": items, "stores": stores, "model": model}

"""Per-band encodings from the metadata and the source profile, including Sentinel-2's
processing-baseline offset, and multi-band assets."""

from __future__ import annotations

import pystac
import pytest

from relaymap.ingest.profiles import plan_read


def _item(baseline: str | None, raster: dict | None, key: str = "red", collection=None):
    props = {"s2:processing_baseline": baseline} if baseline else {}
    item = pystac.Item(
        "s2",
        None,
        None,
        None,
        {**props, "start_datetime": "2024-01-01T00:00:00Z", "end_datetime": "2024-01-01T00:00:00Z"},
        collection=collection,
    )
    fields = {"raster:bands": [raster]} if raster is not None else {}
    item.add_asset(key, pystac.Asset("file:///x.tif", extra_fields=fields))
    if key == "B04":
        item.add_asset("SCL", pystac.Asset("file:///scl.tif"))
    return item


@pytest.mark.parametrize(
    ("baseline", "raster", "key", "collection", "expected"),
    [
        # baseline 04.00+: DN = 10000 * reflectance + 1000, metadata without an offset
        ("04.00", {"nodata": 0, "scale": 1e-4}, "red", None, (0.0, 1e-4, -0.1)),
        ("05.09", {"nodata": 0, "scale": 1e-4}, "red", None, (0.0, 1e-4, -0.1)),
        # older baselines: no offset
        ("02.14", {"nodata": 0, "scale": 1e-4}, "red", None, (0.0, 1e-4, 0.0)),
        # the provider already wrote the offset: it is used as is, never applied twice
        ("04.00", {"nodata": 0, "scale": 1e-4, "offset": -0.1}, "red", None, (0.0, 1e-4, -0.1)),
        # an unknown catalog without a scale: DN units, so the offset is -1000 DN
        ("04.00", {"nodata": 0}, "red", None, (0.0, 1.0, -1000.0)),
        (None, {}, "red", None, (None, 1.0, 0.0)),
        # Planetary Computer's layout (B04, SCL, no raster:bands): the profile's 1e-4 and
        # nodata 0, the baseline offset in reflectance
        ("05.11", None, "B04", "sentinel-2-l2a", (0.0, 1e-4, -0.1)),
        ("02.12", None, "B04", "sentinel-2-l2a", (0.0, 1e-4, 0.0)),
        # Earth Search's layout, the metadata without a scale: the profile's
        ("05.00", {"nodata": 0}, "red", "sentinel-2-c1-l2a", (0.0, 1e-4, -0.1)),
    ],
)
def test_profile_band_encoding(baseline, raster, key, collection, expected):
    (read,) = plan_read(_item(baseline, raster, key, collection), ["red"]).bands
    assert read.asset == key
    assert (read.nodata, read.scale) == expected[:2]
    assert read.offset == pytest.approx(expected[2])


@pytest.mark.parametrize("metadata", ["eo:bands", "bands"])
def test_load_a_four_band_asset_by_band_names_in_the_order_asked(tmp_path, metadata):
    """One 4-band COG asset (as NAIP, Planet or Maxar deliver), its bands described by
    ``eo:bands`` + ``raster:bands`` (STAC 1.0) or by STAC 1.1 ``bands``: every band asked
    for arrives, in the order asked, with its own scale and offset applied."""
    import datetime as dt

    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from relaymap.ingest import ingest_items, open_scene

    stored = ["nir", "red", "green", "blue"]  # the file's band order
    dn = {"nir": 4000, "red": 3000, "green": 2000, "blue": 1000}
    path = tmp_path / "image.tif"
    profile = dict(driver="COG", width=64, height=64, count=4, dtype="uint16", nodata=0)
    transform = from_origin(500_000, 4_800_000, 10, 10)
    with rasterio.open(path, "w", crs="EPSG:32633", transform=transform, **profile) as dst:
        dst.write(np.stack([np.full((64, 64), dn[b], np.uint16) for b in stored]))
    raster = [{"data_type": "uint16", "nodata": 0, "scale": 1e-4, "offset": 0.0} for _ in stored]
    raster[0]["offset"] = -0.1  # nir: DN 4000 -> 0.3
    names = [{"name": b, "common_name": b} for b in stored]
    if metadata == "eo:bands":
        fields = {"eo:bands": names, "raster:bands": raster}
    else:
        fields = {"bands": [{**n, **r} for n, r in zip(names, raster, strict=True)]}
    bounds = rasterio.transform.array_bounds(64, 64, transform)
    from pyproj import Transformer

    lon, lat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform(
        [bounds[0], bounds[2]], [bounds[1], bounds[3]]
    )
    item = pystac.Item(
        "four-band",
        {
            "type": "Polygon",
            "coordinates": [
                [
                    [lon[0], lat[0]],
                    [lon[1], lat[0]],
                    [lon[1], lat[1]],
                    [lon[0], lat[1]],
                    [lon[0], lat[0]],
                ]
            ],
        },
        [lon[0], lat[0], lon[1], lat[1]],
        dt.datetime(2024, 6, 1, tzinfo=dt.UTC),
        {"proj:code": "EPSG:32633", "proj:shape": [64, 64], "proj:transform": list(transform)[:6]},
    )
    item.add_asset("image", pystac.Asset(f"file://{path}", roles=["data"], extra_fields=fields))
    asked = ["blue", "green", "red", "nir"]
    store = ingest_items([item], str(tmp_path / "s.zarr"), asked, label_asset=None)
    image = open_scene(store.url).level(0)["image"].values
    assert list(store.bands) == asked
    for i, b in enumerate(asked):
        want = dn[b] * 1e-4 - (0.1 if b == "nir" else 0.0)
        assert np.allclose(image[i], want, atol=1e-6), (b, float(np.nanmean(image[i])))
    # a band no asset holds: one clear error naming it
    from relaymap.ingest import MissingAssetError

    with pytest.raises(MissingAssetError, match="no band 'swir16'"):
        ingest_items([item], str(tmp_path / "t.zarr"), ["blue", "swir16"], label_asset=None)

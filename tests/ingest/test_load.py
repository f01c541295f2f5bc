"""Per-band encodings, including Sentinel-2's processing-baseline offset."""

from __future__ import annotations

import pystac
import pytest

from relaymap.ingest.load import band_encoding


def _item(baseline: str | None, raster: dict) -> pystac.Item:
    props = {"s2:processing_baseline": baseline} if baseline else {}
    item = pystac.Item(
        "s2",
        None,
        None,
        None,
        {**props, "start_datetime": "2024-01-01T00:00:00Z", "end_datetime": "2024-01-01T00:00:00Z"},
    )
    item.add_asset("B04", pystac.Asset("file:///x.tif", extra_fields={"raster:bands": [raster]}))
    return item


@pytest.mark.parametrize(
    ("baseline", "raster", "expected"),
    [
        # baseline 04.00+: DN = 10000 * reflectance + 1000, metadata without an offset
        ("04.00", {"nodata": 0, "scale": 1e-4}, (0.0, 1e-4, -0.1)),
        ("05.09", {"nodata": 0, "scale": 1e-4}, (0.0, 1e-4, -0.1)),
        # older baselines: no offset
        ("02.14", {"nodata": 0, "scale": 1e-4}, (0.0, 1e-4, 0.0)),
        # the provider already wrote the offset: it is used as is, never applied twice
        ("04.00", {"nodata": 0, "scale": 1e-4, "offset": -0.1}, (0.0, 1e-4, -0.1)),
        # no scale: DN units, so the offset is -1000 DN
        ("04.00", {"nodata": 0}, (0.0, 1.0, -1000.0)),
        (None, {}, (None, 1.0, 0.0)),
    ],
)
def test_band_encoding(baseline, raster, expected):
    nodata, scale, offset = band_encoding(_item(baseline, raster), "B04")
    assert (nodata, scale) == expected[:2]
    assert offset == pytest.approx(expected[2])

"""A fixed, reproducible grid over an area of interest: cells of odc-geo's ``GridSpec``.

The grid is a tiling of a projected CRS (the UTM zone of the area's centroid by default)
anchored at the CRS origin, so a cell's pixels and id depend only on the CRS, the resolution
and the cell size: the same area and settings give the same cells on any machine, and
overlapping areas share their cells. Cell ids read ``<epsg>-<res>m-<px>-x<ix>-y<iy>``
(a minus sign in an index is written ``m``).

An area spanning UTM zones gets one grid, in the zone of its centroid: pixels far from the
zone are slightly distorted but the map is one seamless product. Users who want one grid
per zone map each zone's part as its own area, or give ``crs`` (e.g. an equal-area CRS).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from odc.geo import xy_
from odc.geo.crs import CRS
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry, box, unary_union
from odc.geo.gridspec import GridSpec

from relaymap.catalog.storage import read_bytes

from .errors import AreaError

#: Largest area mapped unless told otherwise, km2 (a continent is a config change away;
#: a typo in a bbox should not start one).
MAX_AREA_KM2 = 2_000_000.0


@dataclass(frozen=True)
class Cell:
    """One grid cell: its stable id, its grid index and its pixel grid."""

    id: str
    index: tuple[int, int]
    geobox: GeoBox


def read_area(area: str | Mapping[str, Any], crs: str = "EPSG:4326") -> Geometry:
    """An area of interest as a polygon geometry.

    Args:
        area: a bbox ``"minx,miny,maxx,maxy"``; a GeoJSON Polygon/MultiPolygon, Feature or
            FeatureCollection (a dict, a JSON string, or a file path/URL).
        crs: the CRS of the coordinates (GeoJSON is WGS84 unless a legacy ``crs`` member
            says otherwise).

    Raises:
        AreaError: unreadable, not a polygon, or empty.
    """
    doc: Any = area
    if isinstance(area, str):
        text = area.strip()
        parts = text.split(",")
        if len(parts) == 4:
            try:
                x0, y0, x1, y1 = map(float, parts)
            except ValueError:
                raise AreaError(
                    f"area {area!r}: a bbox is four numbers minx,miny,maxx,maxy"
                ) from None
            if not (x0 < x1 and y0 < y1):
                raise AreaError(f"area bbox {area!r} is empty: need minx < maxx and miny < maxy")
            return _on_earth(box(x0, y0, x1, y1, crs), area)
        try:
            doc = json.loads(text) if text.startswith("{") else json.loads(read_bytes(text))
        except (OSError, ValueError) as e:
            raise AreaError(f"area {area!r} is neither a bbox nor readable GeoJSON: {e}") from None
    crs = ((doc.get("crs") or {}).get("properties") or {}).get("name", crs)
    geoms = _polygons(doc, where=str(area)[:80])
    geom = unary_union([Geometry(g, crs) for g in geoms])
    if geom is None or geom.is_empty or geom.area == 0:
        raise AreaError(f"area {str(area)[:80]!r} is empty (zero area)")
    if not geom.is_valid:
        geom = geom.buffer(0)
    return _on_earth(geom, area)


def _on_earth(geom: Geometry, area: Any) -> Geometry:
    """``geom``, if lon/lat coordinates lie within [-180, 180] x [-90, 90]."""
    if geom.crs is not None and geom.crs.geographic:
        x0, y0, x1, y1 = geom.boundingbox
        if not (-180 <= x0 < x1 <= 180 and -90 <= y0 < y1 <= 90):
            raise AreaError(
                f"area {str(area)[:80]!r} lies outside lon/lat [-180, 180] x [-90, 90] "
                f"(bounds {x0:g},{y0:g},{x1:g},{y1:g}); give lon/lat degrees, or GeoJSON "
                "with its CRS"
            )
    return geom


def _polygons(doc: Any, where: str) -> list[dict]:
    kind = doc.get("type") if isinstance(doc, Mapping) else None
    if kind == "FeatureCollection":
        return [g for f in doc.get("features", []) for g in _polygons(f, where)]
    if kind == "Feature":
        return _polygons(doc.get("geometry") or {}, where)
    if kind in ("Polygon", "MultiPolygon"):
        return [dict(doc)]
    raise AreaError(
        f"area {where!r} is a {kind or type(doc).__name__}, not a Polygon or MultiPolygon "
        f"(or a Feature/FeatureCollection of them)"
    )


@dataclass(frozen=True)
class AreaGrid:
    """The cells of a grid that an area touches."""

    area: Geometry
    gridspec: GridSpec
    cell_px: int
    cells: tuple[Cell, ...]

    @property
    def crs(self) -> CRS:
        return self.gridspec.crs

    @property
    def resolution(self) -> float:
        return float(self.gridspec.resolution.x)


def cell_id(crs: CRS, resolution: float, cell_px: int, index: tuple[int, int]) -> str:
    """A cell's stable id (see the module docstring)."""
    code = crs.epsg if crs.epsg is not None else "crs"
    ix, iy = (str(i).replace("-", "m") for i in index)
    return f"{code}-{resolution:g}m-{cell_px}-x{ix}-y{iy}"


def area_grid(
    area: Geometry,
    *,
    resolution: float,
    cell_px: int,
    crs: str | None = None,
    max_area_km2: float = MAX_AREA_KM2,
) -> AreaGrid:
    """The grid cells (``cell_px`` a side at ``resolution`` metres) touching ``area``.

    Raises:
        AreaError: the area is larger than ``max_area_km2``, or the CRS is not projected.
    """
    target = CRS(crs) if crs else CRS.utm(area.centroid.to_crs("EPSG:4326"))
    if not target.projected:
        raise AreaError(f"the grid CRS must be projected (metres), got {target}")
    projected = area.to_crs(target)
    km2 = projected.area / 1e6
    if km2 > max_area_km2:
        raise AreaError(
            f"the area covers {km2:,.0f} km2, more than the limit of {max_area_km2:,.0f} km2; "
            f"raise max_area_km2 if that is intended"
        )
    spec = GridSpec(target, tile_shape=(cell_px, cell_px), resolution=resolution, origin=xy_(0, 0))
    cells = tuple(
        Cell(cell_id(target, resolution, cell_px, idx), idx, gbox)
        for idx, gbox in spec.tiles_from_geopolygon(projected)
    )
    return AreaGrid(area, spec, cell_px, cells)

"""A period's mosaic: one GDAL VRT over its cell COGs, opening in QGIS/GDAL as one layer.

Cells of one grid share CRS and pixel size and never overlap, so the VRT is a list of
``SimpleSource`` rectangles. Source paths are relative to the VRT (the folder can be copied
or synced to another bucket); the band carries the class palette, category names and
nodata 255; its ``OverviewList`` gives it overviews down to about
256 px, which GDAL reads from the cells' own (mode-resampled) overviews: zoomed-out views
never read full-resolution pixels.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from typing import Any
from xml.sax.saxutils import escape

import rasterio

from relaymap.catalog.storage import atomic_write, gdal_env

from .cog import NODATA, palette


def _path(url: str) -> str:
    return url.split("://", 1)[-1]


def write_mosaic(url: str, cogs: Sequence[str], classes: Sequence[Mapping[str, Any]]) -> str:
    """Write the VRT mosaic of ``cogs`` (class COGs on one grid) at ``url``; returns ``url``.

    Raises:
        ValueError: COGs on different CRSs or pixel sizes.
    """
    infos = []
    with rasterio.Env(**gdal_env()):
        for cog in cogs:
            with rasterio.open(cog) as src:
                infos.append(
                    (cog, src.crs, src.transform, src.width, src.height, src.block_shapes[0])
                )
    crs, t0 = infos[0][1], infos[0][2]
    for cog, c, t, *_ in infos:
        if c != crs or (t.a, t.e) != (t0.a, t0.e):
            raise ValueError(f"{cog} is not on the grid of {infos[0][0]}: cannot mosaic")
    x0 = min(t.c for _, _, t, *_ in infos)
    y0 = max(t.f for _, _, t, *_ in infos)
    x1 = max(t.c + w * t.a for _, _, t, w, _, _ in infos)
    y1 = min(t.f + h * t.e for _, _, t, _, h, _ in infos)
    width, height = round((x1 - x0) / t0.a), round((y1 - y0) / t0.e)
    folder = posixpath.dirname(_path(url))
    factors, f = [], 2
    while max(width, height) / f >= 128:  # overviews down to ~256 px: one tile for a web map
        factors.append(f)
        f *= 2
    colours = palette(classes)
    entries = "".join(
        '<Entry c1="{}" c2="{}" c3="{}" c4="{}"/>'.format(*colours.get(i, (0, 0, 0, 0)))
        for i in range(256)
    )
    names = {int(c["index"]): str(c["name"]) for c in classes}
    categories = "".join(
        f"<Category>{escape(names.get(i, ''))}</Category>" for i in range(max(names) + 1)
    )
    sources = []
    for cog, _, t, w, h, (bh, bw) in infos:
        rel = posixpath.relpath(_path(cog), folder)
        dx, dy = round((t.c - x0) / t0.a), round((t.f - y0) / t0.e)
        size = f'RasterXSize="{w}" RasterYSize="{h}"'
        sources.append(
            f"""    <SimpleSource>
      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>
      <SourceBand>1</SourceBand>
      <SourceProperties {size} DataType="Byte" BlockXSize="{bw}" BlockYSize="{bh}"/>
      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>
      <DstRect xOff="{dx}" yOff="{dy}" xSize="{w}" ySize="{h}"/>
    </SimpleSource>"""
        )
    overviews = (
        f'<OverviewList resampling="nearest">{" ".join(map(str, factors))}</OverviewList>'
        if factors
        else ""
    )
    xml = f"""<VRTDataset rasterXSize="{width}" rasterYSize="{height}">
  <SRS dataAxisToSRSAxisMapping="1,2">{escape(crs.to_wkt())}</SRS>
  <GeoTransform>{x0!r}, {t0.a!r}, 0.0, {y0!r}, 0.0, {t0.e!r}</GeoTransform>
  {overviews}
  <VRTRasterBand dataType="Byte" band="1">
    <NoDataValue>{NODATA}</NoDataValue>
    <ColorInterp>Palette</ColorInterp>
    <ColorTable>{entries}</ColorTable>
    <CategoryNames>{categories}</CategoryNames>
{chr(10).join(sources)}
  </VRTRasterBand>
</VRTDataset>
"""
    atomic_write(url, xml.encode())
    return url

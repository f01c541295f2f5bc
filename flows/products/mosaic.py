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
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

import rasterio

from relaymap.catalog.storage import atomic_write, gdal_env

from .cog import NODATA, palette


def _path(url: str) -> str:
    return url.split("://", 1)[-1]


@dataclass(frozen=True)
class MosaicLayout:
    """Where each COG of a mosaic sits: the VRT's grid and one rectangle per COG."""

    url: str
    crs: Any
    #: ``(x0, res_x, y0, res_y)`` of the mosaic's top-left corner and pixel size.
    origin: tuple[float, float, float, float]
    width: int
    height: int
    #: Per COG: path relative to the VRT, ``(x, y)`` offset in the mosaic, ``(w, h)``,
    #: ``(block_h, block_w)``.
    cells: tuple[tuple[str, tuple[int, int], tuple[int, int], tuple[int, int]], ...]

    def header(self) -> str:
        """The VRT's opening: size, SRS, geotransform and overview levels (down to about
        256 px, which GDAL reads from the cells' own overviews)."""
        factors, f = [], 2
        while max(self.width, self.height) / f >= 128:  # overviews down to ~256 px
            factors.append(f)
            f *= 2
        overviews = (
            f'<OverviewList resampling="nearest">{" ".join(map(str, factors))}</OverviewList>'
            if factors
            else ""
        )
        x0, a, y0, e = self.origin
        return f"""<VRTDataset rasterXSize="{self.width}" rasterYSize="{self.height}">
  <SRS dataAxisToSRSAxisMapping="1,2">{escape(self.crs.to_wkt())}</SRS>
  <GeoTransform>{x0!r}, {a!r}, 0.0, {y0!r}, 0.0, {e!r}</GeoTransform>
  {overviews}"""

    def sources(self, band: int, dtype: str = "Byte") -> list[str]:
        """A ``SimpleSource`` per COG for band ``band`` (1-based) of the sources."""
        out = []
        for rel, (dx, dy), (w, h), (bh, bw) in self.cells:
            size = f'RasterXSize="{w}" RasterYSize="{h}"'
            out.append(
                f"""    <SimpleSource>
      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>
      <SourceBand>{band}</SourceBand>
      <SourceProperties {size} DataType="{dtype}" BlockXSize="{bw}" BlockYSize="{bh}"/>
      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>
      <DstRect xOff="{dx}" yOff="{dy}" xSize="{w}" ySize="{h}"/>
    </SimpleSource>"""
            )
        return out


def mosaic_layout(url: str, cogs: Sequence[str]) -> MosaicLayout:
    """The layout of a VRT at ``url`` over ``cogs`` (rasters on one grid; headers only).

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
    cells = tuple(
        (
            posixpath.relpath(_path(cog), folder),
            (round((t.c - x0) / t0.a), round((t.f - y0) / t0.e)),
            (w, h),
            block,
        )
        for cog, _, t, w, h, block in infos
    )
    return MosaicLayout(url, crs, (x0, t0.a, y0, t0.e), width, height, cells)


def write_mosaic(url: str, cogs: Sequence[str], classes: Sequence[Mapping[str, Any]]) -> str:
    """Write the VRT mosaic of ``cogs`` (class COGs on one grid) at ``url``; returns ``url``.

    Raises:
        ValueError: COGs on different CRSs or pixel sizes.
    """
    layout = mosaic_layout(url, cogs)
    colours = palette(classes)
    entries = "".join(
        '<Entry c1="{}" c2="{}" c3="{}" c4="{}"/>'.format(*colours.get(i, (0, 0, 0, 0)))
        for i in range(256)
    )
    names = {int(c["index"]): str(c["name"]) for c in classes}
    categories = "".join(
        f"<Category>{escape(names.get(i, ''))}</Category>" for i in range(max(names) + 1)
    )
    xml = f"""{layout.header()}
  <VRTRasterBand dataType="Byte" band="1">
    <NoDataValue>{NODATA}</NoDataValue>
    <ColorInterp>Palette</ColorInterp>
    <ColorTable>{entries}</ColorTable>
    <CategoryNames>{categories}</CategoryNames>
{chr(10).join(layout.sources(1))}
  </VRTRasterBand>
</VRTDataset>
"""
    atomic_write(url, xml.encode())
    return url

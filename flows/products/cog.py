"""Map products on disk: class and probability GeoTIFFs written strip by strip, turned into
COGs (internal tiles, mode overviews, palette), and a PNG quicklook with a legend.

Rows arrive from the stitcher top to bottom, so they go into a tiled scratch GeoTIFF; GDAL's
COG driver then copies it into the final layout (tiles, overviews) without holding the
raster in memory; :func:`publish` uploads each product atomically.
"""

from __future__ import annotations

import colorsys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from PIL import Image, ImageDraw

from relaymap.catalog.storage import atomic_upload, atomic_write, read_bytes

#: Class COG nodata (also ``relaymap.ingest.labels.IGNORE``).
NODATA = 255
#: GDAL block cache for writing products (``rasterio.Env(GDAL_CACHEMAX=...)``): GDAL's
#: default, 5% of RAM, would fill while building the overviews of a large raster.
GDAL_CACHE_MB = 256
#: Probability COG scale: a stored value v means probability v / 254; 255 is nodata.
PROB_SCALE = 254
#: How pictures of maps (quicklooks, the web map) draw nodata: diagonal stripes of these
#: two greys, 4 px wide, unlike any class colour and unlike a white or grey page.
NODATA_HATCH = ((0x5F, 0x63, 0x68), (0x9A, 0xA0, 0xA6))


def palette(classes: Sequence[Mapping[str, Any]]) -> dict[int, tuple[int, int, int, int]]:
    """RGBA per class index from each class's ``color_hint`` (hex), else evenly spaced hues."""
    colours = {}
    for i, c in enumerate(classes):
        hint = (c.get("color_hint") or "").lstrip("#")
        if len(hint) == 6:
            colours[int(c["index"])] = (*bytes.fromhex(hint), 255)
        else:
            r, g, b = colorsys.hsv_to_rgb(i / max(len(classes), 1), 0.65, 0.9)
            colours[int(c["index"])] = (int(r * 255), int(g * 255), int(b * 255), 255)
    colours[NODATA] = (0, 0, 0, 0)
    return colours


class StripWriter:
    """A tiled uint8 scratch GeoTIFF that takes full-width row strips, top to bottom."""

    def __init__(
        self,
        path: str,
        *,
        shape_yx: tuple[int, int],
        count: int,
        crs: Any,
        transform: Affine,
        colormap: Mapping[int, tuple[int, ...]] | None = None,
    ) -> None:
        self.ds = rasterio.open(
            path,
            "w",
            driver="GTiff",
            height=shape_yx[0],
            width=shape_yx[1],
            count=count,
            dtype="uint8",
            crs=crs,
            transform=transform,
            nodata=NODATA,
            tiled=True,
            blockxsize=512,
            blockysize=512,
            compress="ZSTD",  # fast; the COG copy recompresses
            BIGTIFF="IF_SAFER",
        )
        if colormap is not None:
            self.ds.write_colormap(1, colormap)

    def write(self, y0: int, rows: np.ndarray) -> None:
        """Write ``(count, h, W)`` uint8 rows starting at scene row ``y0``."""
        h, w = rows.shape[1:]
        self.ds.write(rows, window=rasterio.windows.Window(0, y0, w, h))

    def close(self) -> None:
        self.ds.close()


class MapWriter:
    """The stitcher's sink: class (and probability) rows into scratch GeoTIFFs in ``scratch``
    (``classes.tif``, ``probabilities.tif``) on the scene's grid, ready for :func:`publish`."""

    def __init__(
        self,
        scratch: Path,
        gbox: Any,
        classes: Sequence[Mapping[str, Any]],
        *,
        probabilities: bool = False,
        low_confidence: float | None = None,
    ) -> None:
        grid = dict(shape_yx=gbox.shape, crs=gbox.crs.to_wkt(), transform=gbox.transform)
        self.classes = StripWriter(
            str(scratch / "classes.tif"), count=1, colormap=palette(classes), **grid
        )
        self.probs = (
            StripWriter(str(scratch / "probabilities.tif"), count=len(classes), **grid)
            if probabilities
            else None
        )
        #: Mapped pixels per class, counted as rows go by (the map's class areas).
        self.counts = np.zeros(len(classes), dtype=np.int64)
        #: Of those, the pixels whose highest probability is below ``low_confidence``.
        self.low_counts = np.zeros(len(classes), dtype=np.int64)
        self.low_confidence = low_confidence

    def sink(self, y0: int, probs: np.ndarray, valid: np.ndarray) -> None:
        """Rows ``y0..`` of ``(K, h, W)`` probabilities and their ``(h, W)`` data mask."""
        classes = np.where(valid, probs.argmax(0), NODATA).astype(np.uint8)
        self.classes.write(y0, classes[None])
        self.counts += np.bincount(classes[valid], minlength=len(self.counts))
        if self.low_confidence is not None:
            low = valid & (probs.max(0) < self.low_confidence)
            self.low_counts += np.bincount(classes[low], minlength=len(self.counts))
        if self.probs is not None:
            scaled = np.rint(probs * PROB_SCALE).astype(np.uint8)
            self.probs.write(y0, np.where(valid, scaled, NODATA))

    def close(self) -> None:
        self.classes.close()
        if self.probs is not None:
            self.probs.close()


def to_cog(src: str, dst: str, *, compress: str = "DEFLATE", resampling: str = "MODE") -> None:
    """Copy a GeoTIFF into a COG: 512 px internal tiles, overviews (``resampling``),
    ``compress`` (DEFLATE or ZSTD); the palette and nodata carry over."""
    rasterio.shutil.copy(
        src,
        dst,
        driver="COG",
        BLOCKSIZE=512,
        COMPRESS=compress,
        PREDICTOR="NO",
        OVERVIEWS="AUTO",
        OVERVIEW_RESAMPLING=resampling,
        RESAMPLING="NEAREST",
        BIGTIFF="IF_SAFER",
        NUM_THREADS="ALL_CPUS",
    )


def hatch(shape_yx: tuple[int, int]) -> np.ndarray:
    """``(H, W, 4)`` uint8 RGBA of the nodata stripes (:data:`NODATA_HATCH`)."""
    yy, xx = np.mgrid[0 : shape_yx[0], 0 : shape_yx[1]]
    stripes = np.array([(*c, 255) for c in NODATA_HATCH], dtype=np.uint8)
    return stripes[((yy + xx) // 4) % 2]


def quicklook(
    cog: str, dst: str, classes: Sequence[Mapping[str, Any]], *, max_px: int = 512
) -> None:
    """A PNG of the class COG (read from its overviews, at most ``max_px`` a side) with a
    legend of the class colours and names underneath; nodata is grey stripes
    (:data:`NODATA_HATCH`), so it never looks like the page around it."""
    with rasterio.open(cog) as src:
        scale = max(src.height, src.width) / max_px
        scale = max(scale, 1.0)
        shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
        classes_img = src.read(1, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)
    colours = palette(classes)
    lut = np.zeros((256, 4), dtype=np.uint8)
    for k, rgba in colours.items():
        lut[k] = rgba
    rgba = lut[classes_img]
    nodata = classes_img == NODATA
    rgba[nodata] = hatch(classes_img.shape)[nodata]
    body = Image.fromarray(rgba, "RGBA")
    line, pad = 16, 6
    legend_h = pad + line * (len(classes) + 1) + pad
    width = max(body.width, 160)
    out = Image.new("RGBA", (width, body.height + legend_h), (255, 255, 255, 255))
    out.paste(body, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, c in enumerate(classes):
        y = body.height + pad + i * line
        draw.rectangle([pad, y + 2, pad + 11, y + 13], fill=colours[int(c["index"])])
        draw.text((pad + 18, y), str(c["name"]), fill=(0, 0, 0, 255))
    y = body.height + pad + len(classes) * line
    out.paste(Image.fromarray(hatch((12, 12)), "RGBA"), (pad, y + 2))
    draw.text((pad + 18, y), "no data", fill=(0, 0, 0, 255))
    out.save(dst, format="PNG")


def write_class_cog(
    url: str,
    values: np.ndarray,
    *,
    crs: Any,
    transform: Affine,
    classes: Sequence[Mapping[str, Any]],
    tags: Mapping[str, str] | None = None,
    compress: str = "DEFLATE",
) -> None:
    """A uint8 class raster ``(H, W)`` (nodata 255) as a COG at ``url``, as map COGs are
    written (palette, mode overviews, class names beside it), with GDAL metadata ``tags``;
    it appears whole or not at all."""
    with (
        tempfile.TemporaryDirectory(prefix="relaymap-cog-") as tmp,
        rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB),
    ):
        scratch = str(Path(tmp) / "classes.tif")
        writer = StripWriter(
            scratch,
            shape_yx=values.shape,
            count=1,
            crs=crs,
            transform=transform,
            colormap=palette(classes),
        )
        try:
            writer.write(0, values[None].astype(np.uint8))
            if tags:
                writer.ds.update_tags(**tags)
        finally:
            writer.close()
        with atomic_upload(url, suffix=".tif") as dst:
            to_cog(scratch, dst, compress=compress)
    atomic_write(url + ".aux.xml", category_names_xml(classes).encode())


def category_names_xml(classes: Sequence[Mapping[str, Any]]) -> str:
    """A GDAL PAM sidecar (``<cog>.aux.xml``) naming the class values: GDAL and QGIS read it
    next to the COG and show class names instead of numbers."""
    names = {int(c["index"]): str(c["name"]) for c in classes}
    cats = "".join(
        f"      <Category>{escape(names.get(i, ''))}</Category>\n" for i in range(max(names) + 1)
    )
    return (
        '<PAMDataset>\n  <PAMRasterBand band="1">\n    <CategoryNames>\n'
        f"{cats}    </CategoryNames>\n  </PAMRasterBand>\n</PAMDataset>\n"
    )


def category_names(url: str) -> list[str]:
    """The class names of a class COG from its ``.aux.xml`` sidecar (as GDAL reads them),
    by value; ``[]`` when there is none."""
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(read_bytes(url + ".aux.xml"))
    except (FileNotFoundError, ElementTree.ParseError):
        return []
    return [c.text or "" for c in root.iterfind("./PAMRasterBand/CategoryNames/Category")]


def publish(
    scratch: Path,
    urls: Mapping[str, str | None],
    classes: Sequence[Mapping[str, Any]],
    *,
    compress: str = "DEFLATE",
) -> None:
    """``scratch/{classes,probabilities}.tif`` -> COGs (and the quicklook) at ``urls``
    (any storage URL; None: not wanted), the class COG with its category names beside it
    (``classes.tif.aux.xml``). Each file appears whole or not at all."""
    for name in ("probabilities", "classes"):
        if not urls.get(name):
            continue
        with atomic_upload(urls[name], suffix=".tif") as dst:
            resampling = "MODE" if name == "classes" else "AVERAGE"
            to_cog(str(scratch / f"{name}.tif"), dst, compress=compress, resampling=resampling)
            if name == "classes":
                atomic_write(urls[name] + ".aux.xml", category_names_xml(classes).encode())
                if urls.get("quicklook"):
                    with atomic_upload(urls["quicklook"], suffix=".png") as png:
                        quicklook(dst, png, classes)

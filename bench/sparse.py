"""Sparse-evidence scenes: two field classes told apart only by the density of small objects
spread over their district, which only a window several times the local one can count.

A scene is a Voronoi mosaic of *districts*, each ``field_a`` (sparse) or ``field_b``
(dense), under three classes any local window sees (``water``, ``forest``, ``urban``). Both
field classes share one spectrum and texture; each carries small bright objects (roofs,
greenhouses: ``obj_px`` squares, labelled as their field) scattered at density ``d`` in
``field_a`` and ``contrast * d`` in ``field_b``. ``d`` puts a fraction of an object in a
local window on average (``objects_per_window``), so a local window usually sees none or
one, whichever the class: ambiguous. A global window of ``factor`` times the side sees
``factor**2`` times as many: the density shows, as faint bright pixels after the ``factor``
times area average. District sides are drawn around the global window's side.

:func:`draw_family` draws a generator per seed (object size, density contrast, density and
district size all vary), so no benchmark number belongs to one generator.
:func:`write_sparse_stores` writes the scenes as relaymap scene stores (levels x2 .. x8), the
same stores :mod:`bench.context` trains on for the other family. Everything is a function
of the seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.xr import xr_coords

from relaymap.ingest import LabelClass, write_scene

#: Class names in index order; the last two are the context pair.
CLASS_NAMES: tuple[str, ...] = ("water", "forest", "urban", "field_a", "field_b")
#: The pair only the density of objects over a district separates.
CONTEXT_PAIR: tuple[str, str] = ("field_a", "field_b")
#: Mean reflectance (blue, green, red, nir) per class; the two fields are the same.
SPECTRA: dict[str, tuple[float, float, float, float]] = {
    "water": (0.06, 0.05, 0.03, 0.015),
    "forest": (0.03, 0.05, 0.035, 0.35),
    "urban": (0.12, 0.13, 0.14, 0.20),
    "field_a": (0.06, 0.09, 0.10, 0.30),
    "field_b": (0.06, 0.09, 0.10, 0.30),
}
#: Reflectance of the small objects (bright in the visible, like roofs).
OBJECT_SPECTRUM = (0.45, 0.45, 0.45, 0.40)
BANDS = ("blue", "green", "red", "nir")
RES_M = 10.0


@dataclass(frozen=True)
class SparseGenerator:
    """One member of the family (all sizes in pixels of 10 m)."""

    #: Side of the small square objects.
    obj_px: int
    #: Objects per local window (``window_px**2`` pixels) of ``field_a`` on average.
    objects_per_window: float
    #: Object density of ``field_b`` over ``field_a``.
    contrast: float
    #: Typical district side (Voronoi cell spacing).
    district_px: int
    #: Local window side the densities refer to.
    window_px: int


def draw_family(seed: int, *, window_px: int, factor: int) -> SparseGenerator:
    """The generator of ``seed``: object side 1/2-3/4 of ``factor`` px (of a global pixel's
    side, so an object shows at the global window's resolution: 4-6 px at factor 8, 2-3 px
    at factor 4), 0.25-0.5 objects per local window in
    ``field_a``, ``field_b`` 3-5x denser, districts 1.2-2x the global window's side (a
    global window centred in a district mostly sees that district)."""
    rng = np.random.default_rng([seed, 29])
    return SparseGenerator(
        obj_px=int(rng.integers(math.ceil(factor / 2), math.ceil(3 * factor / 4) + 1)),
        objects_per_window=float(rng.uniform(0.25, 0.5)),
        contrast=float(rng.uniform(3.0, 5.0)),
        district_px=int(rng.uniform(1.2, 2.0) * factor * window_px),
        window_px=window_px,
    )


def _smooth(shape: tuple[int, int], cell_px: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [-1, 1]: uniform values on a ``cell_px`` lattice, bilinear between."""
    h, w = shape
    gh, gw = int(h / cell_px) + 2, int(w / cell_px) + 2
    grid = rng.uniform(-1, 1, (gh, gw))
    ys, xs = np.arange(h) / cell_px, np.arange(w) / cell_px
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    g00, g01 = grid[np.ix_(y0, x0)], grid[np.ix_(y0, x0 + 1)]
    g10, g11 = grid[np.ix_(y0 + 1, x0)], grid[np.ix_(y0 + 1, x0 + 1)]
    return (1 - fy) * ((1 - fx) * g00 + fx * g01) + fy * ((1 - fx) * g10 + fx * g11)


def _blobs(shape, n: int, radius_px: float, rng: np.random.Generator) -> np.ndarray:
    """Union of ``n`` wobbly discs of about ``radius_px``: ``(H, W)`` bool."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    edge = 0.3 * _smooth(shape, radius_px / 2, rng)
    out = np.zeros(shape, dtype=bool)
    for _ in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = radius_px * rng.uniform(0.7, 1.3)
        out |= np.hypot(yy - cy, xx - cx) / r - edge < 1
    return out


def make_scene(
    gen: SparseGenerator, size_px: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ``(4, H, W)`` float32 reflectance and ``(H, W)`` uint8 class indices."""
    shape = (size_px, size_px)
    idx = {n: i for i, n in enumerate(CLASS_NAMES)}
    # districts: Voronoi cells around jittered lattice points, each sparse or dense
    n_side = max(2, round(size_px / gen.district_px))
    step = size_px / n_side
    centres = [
        ((i + rng.uniform(0.2, 0.8)) * step, (j + rng.uniform(0.2, 0.8)) * step)
        for i in range(n_side)
        for j in range(n_side)
    ]
    kinds = rng.permutation(np.arange(len(centres)) % 2)  # half sparse, half dense
    yy, xx = np.mgrid[0:size_px, 0:size_px].astype(np.float32)
    # wobbly borders: the Voronoi cells of smoothly displaced coordinates
    warp = 0.2 * gen.district_px
    wy = yy + warp * _smooth(shape, gen.district_px / 2, rng)
    wx = xx + warp * _smooth(shape, gen.district_px / 2, rng)
    best = np.full(shape, np.inf, dtype=np.float32)
    district = np.zeros(shape, dtype=np.int64)
    for k, (cy, cx) in enumerate(centres):
        dk = np.hypot(wy - cy, wx - cx)
        district[dk < best] = k
        best = np.minimum(best, dk)
    dense = kinds[district].astype(bool)
    cls = np.where(dense, idx["field_b"], idx["field_a"]).astype(np.uint8)
    # the small objects, labelled as their field
    d = gen.objects_per_window / gen.window_px**2
    img_obj = np.zeros(shape, dtype=bool)
    for density, where in ((d, ~dense), (gen.contrast * d, dense)):
        n = rng.poisson(density * where.sum())
        ys = rng.integers(0, size_px - gen.obj_px, n)
        xs = rng.integers(0, size_px - gen.obj_px, n)
        for y, x in zip(ys, xs, strict=True):
            if where[y, x]:
                img_obj[y : y + gen.obj_px, x : x + gen.obj_px] = True
    # classes any local window sees, over the districts (objects under them vanish)
    w = gen.window_px
    cls[_blobs(shape, max(1, size_px**2 // (8 * w) ** 2), 1.5 * w, rng)] = idx["forest"]
    cls[_blobs(shape, max(1, size_px**2 // (12 * w) ** 2), 1.5 * w, rng)] = idx["urban"]
    phase, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.5) * w
    centre = size_px * rng.uniform(0.2, 0.8) + amp * np.sin(xx / (4 * w) + phase)
    if rng.random() < 0.5:
        yy, xx = xx, yy  # a river running north-south
    cls[np.abs(yy - centre) < 0.5 * w] = idx["water"]
    fields = (cls == idx["field_a"]) | (cls == idx["field_b"])
    img_obj &= fields
    # render: class spectra, patchy fields, urban blocks, texture, the objects, noise
    means = np.array([SPECTRA[n] for n in CLASS_NAMES], dtype=np.float32)
    img = means[cls].transpose(2, 0, 1)  # 4, H, W
    img[:, fields] *= (1 + 0.06 * np.sign(_smooth(shape, 1.5 * w, rng)))[fields]
    urban = cls == idx["urban"]
    img[:, urban] *= (1 + 0.35 * np.sign(_smooth(shape, 2.5, rng)))[urban]
    img *= 1 + 0.06 * _smooth(shape, 4, rng)
    img[:, img_obj] = np.array(OBJECT_SPECTRUM, dtype=np.float32)[:, None]
    img *= 1 + 0.03 * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img, 1e-4, 1.0).astype(np.float32), cls


def write_sparse_stores(
    root: Path, gen: SparseGenerator, *, n_scenes: int, size_px: int, seed: int
) -> list[str]:
    """Write ``n_scenes`` scenes of ``gen`` as scene stores under ``root``; their URLs."""
    rng = np.random.default_rng([seed, 30])
    classes = [LabelClass(i, 10 * (i + 1), n) for i, n in enumerate(CLASS_NAMES)]
    urls = []
    for i in range(n_scenes):
        img, cls = make_scene(gen, size_px, rng)
        x0 = 500_000 + i * (size_px + 100) * RES_M
        gbox = GeoBox.from_bbox(
            (x0, 4_800_000 - size_px * RES_M, x0 + size_px * RES_M, 4_800_000),
            "EPSG:32633",
            resolution=RES_M,
        )
        coords = xr_coords(gbox)
        image = xr.DataArray(
            img, dims=("band", "y", "x"), coords={"band": list(BANDS), **coords}
        ).chunk({"band": -1, "y": 512, "x": 512})
        image.attrs.update(reflectance=True, source_items=[f"sparse-{seed}-{i}"])
        labels = xr.DataArray(cls, dims=("y", "x"), coords=coords).chunk(512)
        url = str(root / f"sparse-{i:02d}.zarr")
        urls.append(write_scene(url, image, labels, classes=classes, chunk_px=128).url)
    return urls


def describe(gen: SparseGenerator) -> dict:
    """The generator's parameters, for a run's JSON."""
    return asdict(gen)

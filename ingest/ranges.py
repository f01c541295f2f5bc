"""Do these pixels look like what the model was trained on? A right map or a clear refusal.

Raw counts read as reflectance (a source without its scale) are 10^3-10^4 standard
deviations off a model's training statistics; a snowy or hazy scene on a vegetation model
is tens. A band is refused when most of its valid pixels lie beyond :data:`MAX_SD`: far
outside anything real, well inside what a missing scale or offset gives.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pystac
from rasterio.errors import NotGeoreferencedWarning

from .errors import IngestError
from .profiles import ReadOptions

#: Standard deviations from the model's training mean beyond which a pixel is out of range.
MAX_SD = 50.0
#: The share of a band's valid pixels out of range that refuses it.
MAX_SHARE = 0.5
#: Pixels per side of the quick look at a source item (:func:`check_item`).
PREFLIGHT_PX = 64
#: What fixes a missing scale where a source is read (``relaymap map``, ``relaymap ingest``).
FIX_AT_SOURCE = (
    "give the source's scale and offset with --scale {band}=... --offset {band}=... "
    "(scale/offset in the config), or check --profile"
)
#: What fixes it for a scene store (``relaymap infer``, which reads stores as they are): the
#: scale is applied when a scene is ingested.
FIX_BY_REINGEST = (
    "a scene store keeps the values its source gave: ingest the scene again with the "
    "source's scale and offset (relaymap ingest ... --scale {band}=... --offset {band}=...)"
)


class OutOfRangeError(IngestError):
    """Pixels far outside what the model was trained on (the message names the likely
    cause and the option that fixes it)."""


def check_range(
    values: np.ndarray,
    bands: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    where: str,
    fix: str = FIX_AT_SOURCE,
) -> None:
    """Refuse ``values`` ``(band, ...)`` (physical units, NaN = no data) when a band lies
    far outside the model's normalisation ``mean``/``std``.

    Args:
        where: the input, as the message names it.
        fix: what to do, with the options the command at hand has (``{band}``: the band):
            :data:`FIX_AT_SOURCE` or :data:`FIX_BY_REINGEST`.

    Raises:
        OutOfRangeError: naming ``where`` (the input), the band, and what to set.
    """
    for band, v, m, s in zip(bands, values, mean, std, strict=True):
        v = v[np.isfinite(v)]
        if v.size == 0:
            continue
        z = np.abs(v - m) / max(float(s), 1e-6)
        if float((z > MAX_SD).mean()) <= MAX_SHARE:
            continue
        median = float(np.median(v))
        if abs(median) > 100 * (abs(m) + s):
            cause = "raw counts (DN) without their scale"
        else:
            cause = "values in other units (a missing or wrong scale or offset)"
        raise OutOfRangeError(
            f"{where}: band {band!r} has a median of {median:.4g}, {float(np.median(z)):.0f} "
            f"standard deviations from what the model was trained on ({m:.4g} ± {s:.4g}): it "
            f"looks like {cause}; {fix.format(band=band)}"
        )


def check_item(
    item: pystac.Item,
    bands: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    where: str,
    read: ReadOptions | None = None,
    fix: str = FIX_AT_SOURCE,
) -> None:
    """Refuse a source item whose values lie far outside the model's normalisation, from
    a quick look before any compute: about :data:`PREFLIGHT_PX` pixels a side over its
    first band's grid, read as ``read`` says (GDAL's average from the overviews).

    Raises:
        OutOfRangeError: as :func:`check_range`.
        SigningError, CorruptRasterError: an asset that cannot be signed or read.
    """
    from .load import load_scene, target_geobox
    from .profiles import plan_read

    native = target_geobox([item], plan_read(item, bands, read))
    res = abs(native.resolution.x) * max(1.0, max(native.shape) / PREFLIGHT_PX)
    image = load_scene(
        [item],
        bands,
        crs=str(native.crs),
        resolution=res,
        bounds=tuple(native.boundingbox),
        read=read,
        overviews=True,
    )
    with warnings.catch_warnings():  # rasterio's own in-memory step of a decimated read
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        values = image.values
    check_range(values, bands, mean, std, where=where, fix=fix)

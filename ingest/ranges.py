"""Do these pixels look like what the model was trained on? A right map or a clear refusal.

Raw counts read as reflectance (a source without its scale) are 10^3-10^4 standard
deviations off a model's training statistics; a snowy or hazy scene on a vegetation model
is tens. A band is refused when most of its valid pixels lie beyond :data:`MAX_SD`: far
outside anything real, well inside what a missing scale or offset gives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import IngestError

#: Standard deviations from the model's training mean beyond which a pixel is out of range.
MAX_SD = 50.0
#: The share of a band's valid pixels out of range that refuses it.
MAX_SHARE = 0.5


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
) -> None:
    """Refuse ``values`` ``(band, ...)`` (physical units, NaN = no data) when a band lies
    far outside the model's normalisation ``mean``/``std``.

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
            f"looks like {cause}; give the source's scale and offset with --scale "
            f"{band}=... --offset {band}=... (scale/offset in the config), or check --profile"
        )

"""Source profiles: how the items of one catalog layout become the model's bands.

Catalogs publish the same imagery differently: Earth Search keys Sentinel-2 assets by
common name (``red``, ``scl``) and gives ``raster:bands`` scale and offset; Planetary
Computer keys them ``B04``, ``SCL`` and gives neither; Landsat Collection 2 Level-2 calls
its NIR ``nir08`` and flags clouds as bits of ``qa_pixel``; a commercial 8-band GeoTIFF
lists its bands in ``eo:bands`` only. A :class:`SourceProfile` declares, as data, what an
item's metadata leaves out: which asset serves each model band, the scale and offset when
``raster:bands`` has none, the mask rule and how hrefs are signed. The profile is chosen
from the item (:func:`choose_profile`) and :class:`ReadOptions` overrides any part of it.

:func:`plan_read` turns an item, the model's bands and the options into an
:class:`ItemRead`: per model band an asset, a band index, a scale, an offset and a nodata
value, or an error naming the item, the band and what to set. Nothing here reads pixels.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pystac
from pydantic import Field, field_validator

from relay_models.config import FrozenConfig

from .errors import IngestError, MissingAssetError


class AmbiguousBandError(IngestError):
    """More than one band of an item could serve a model band (the message lists them)."""


class MaskRule(FrozenConfig):
    """Which pixels of a per-pixel quality asset are not a clear view of the ground."""

    #: The asset's key (matched case-insensitively: ``scl`` finds ``SCL``).
    asset: str
    #: Class values that are not clear (Sentinel-2 SCL: no data, defective, shadow, cloud).
    values: tuple[int, ...] = ()
    #: Bit positions any of which, set, mean not clear (Landsat ``qa_pixel``).
    bits: tuple[int, ...] = Field(default=(), max_length=64)

    def clear(self, raw: np.ndarray) -> np.ndarray:
        """``True`` where ``raw`` (the asset's values) is a clear view."""
        bad = np.isin(raw, self.values) if self.values else np.zeros(raw.shape, bool)
        if self.bits:
            flags = sum(1 << b for b in self.bits)
            bad |= (raw.astype(np.int64) & flags) != 0
        return ~bad


#: Sentinel-2 L2A scene classification: 0 no data, 1 saturated or defective, 3 cloud shadow,
#: 8/9 cloud medium/high probability, 10 cirrus.
S2_SCL = MaskRule(asset="scl", values=(0, 1, 3, 8, 9, 10))
#: Landsat Collection 2 ``qa_pixel``: 0 fill, 1 dilated cloud, 2 cirrus, 3 cloud, 4 shadow.
LANDSAT_QA = MaskRule(asset="qa_pixel", bits=(0, 1, 2, 3, 4))
#: Sentinel-2 band names (``B04``) by the common names models use.
S2_BANDS = {
    "coastal": "B01",
    "blue": "B02",
    "green": "B03",
    "red": "B04",
    "rededge1": "B05",
    "rededge2": "B06",
    "rededge3": "B07",
    "nir": "B08",
    "nir08": "B8A",
    "nir09": "B09",
    "swir16": "B11",
    "swir22": "B12",
}

Signer = Literal["planetary-computer"]


class SourceProfile(FrozenConfig):
    """What a catalog layout's metadata leaves out, declared once."""

    name: str
    title: str
    #: Collection ids it applies to (shell patterns)...
    collections: tuple[str, ...] = ("*",)
    #: ...or items of these platforms (shell patterns, ``platform`` property, any case):
    #: a mirror that renames the collection keeps its profile.
    platforms: tuple[str, ...] = ()
    #: Asset keys an item must have, exactly (how layouts of one collection id differ).
    assets: tuple[str, ...] = ()
    #: Model band -> source band (an asset key, or a band's name or common name), where
    #: the model's name is not the source's.
    bands: dict[str, str] = Field(default_factory=dict)
    #: Scale and offset of bands whose ``raster:bands`` has none (physical = DN * scale +
    #: offset), and their nodata value.
    scale: float | None = None
    offset: float | None = None
    nodata: float | None = None
    #: Sentinel-2 L2A from processing baseline 04.00 on: DN = 10000 * reflectance + 1000;
    #: an item with ``s2:processing_baseline`` >= 04.00 and no offset in its metadata gets
    #: -1000 DN, whatever its catalog calls its collection.
    s2_baseline_offset: bool = True
    mask: MaskRule | None = None
    #: How hrefs are signed before they are read, on the node that reads them
    #: (``planetary-computer`` signs only hrefs on Azure Blob Storage, with the token
    #: service its ``PC_SDK_SAS_URL`` names).
    signer: Signer | None = None

    def matches(self, item: pystac.Item) -> bool:
        collection = item.collection_id or ""
        platform = str(item.properties.get("platform") or "").casefold()
        return (
            any(fnmatch.fnmatchcase(collection, c) for c in self.collections)
            or any(fnmatch.fnmatchcase(platform, p) for p in self.platforms)
        ) and all(a in item.assets for a in self.assets)


#: Built-in profiles, most specific first; the last matches any item.
PROFILES: tuple[SourceProfile, ...] = (
    SourceProfile(
        name="planetary-computer-s2-l2a",
        title="Microsoft Planetary Computer, Sentinel-2 L2A",
        collections=("sentinel-2-l2a",),
        platforms=("sentinel-2*",),
        assets=("B04", "SCL"),
        bands=S2_BANDS,
        scale=1e-4,
        offset=0.0,
        nodata=0,
        mask=S2_SCL,
        signer="planetary-computer",
    ),
    SourceProfile(
        name="earth-search-s2-l2a",
        title="Earth Search v1, Sentinel-2 L2A and Collection 1 L2A (common-name keys)",
        collections=("sentinel-2*",),
        platforms=("sentinel-2*",),
        scale=1e-4,
        nodata=0,
        mask=S2_SCL,
    ),
    SourceProfile(
        name="landsat-c2-l2",
        title="Landsat Collection 2 Level-2 (Earth Search, Planetary Computer)",
        collections=("landsat-c2-l2", "landsat-c2l2-sr", "landsat-c2-l2-sr"),
        platforms=("landsat-*",),
        bands={"nir": "nir08", "swir1": "swir16", "swir2": "swir22"},
        scale=2.75e-5,
        offset=-0.2,
        nodata=0,
        mask=LANDSAT_QA,
        signer="planetary-computer",  # signs only Planetary Computer (Azure blob) hrefs
    ),
    SourceProfile(
        name="generic",
        title="Any catalog: bands by asset key or eo:bands name, raster:bands as published",
        signer="planetary-computer",  # Planetary Computer's other collections (NAIP, ...)
    ),
)


def profile_named(name: str) -> SourceProfile:
    """A built-in profile by name.

    Raises:
        ValueError: naming the profiles there are.
    """
    for p in PROFILES:
        if p.name == name:
            return p
    raise ValueError(f"no source profile {name!r}; there are {', '.join(profile_names())}")


def profile_names() -> list[str]:
    return [p.name for p in PROFILES]


def choose_profile(item: pystac.Item, name: str | None = None) -> SourceProfile:
    """``name``'s profile, or the first built-in one that matches the item."""
    if name is not None:
        return profile_named(name)
    return next(p for p in PROFILES if p.matches(item))


class ReadOptions(FrozenConfig):
    """How a source's items become the model's bands: the profile (chosen from each item
    unless named) and the user's overrides of any part of it."""

    #: A built-in profile (see ``relaymap.ingest.profiles.PROFILES``); None: from the item.
    profile: str | None = None
    #: Model band -> ``asset`` or ``asset:band`` (band: 1-based number or name), e.g.
    #: ``{nir: "image:7"}`` when two bands of an item are tagged ``nir``.
    band_map: dict[str, str] = Field(default_factory=dict)
    #: Scale per model band (``*``: every band), for sources that do not publish one.
    scale: dict[str, float] = Field(default_factory=dict)
    #: Offset per model band (``*``: every band), physical = DN * scale + offset.
    offset: dict[str, float] = Field(default_factory=dict)
    #: The cloud mask: ``auto`` (the profile's), a rule, or None (no mask).
    mask: MaskRule | Literal["auto"] | None = "auto"
    #: Href signing: ``auto`` (the profile's), a signer, or ``none`` (public copies, your
    #: own Azure storage, which Planetary Computer's token service does not serve; and the
    #: way to run when the token service cannot be reached).
    sign: Signer | Literal["auto", "none"] = "auto"
    #: The token service's total time budget per item, in seconds (default: the reading
    #: node's ``RELAYMAP_SIGN_TIMEOUT_S``, else 30; see :mod:`relaymap.ingest.signing`).
    sign_timeout_s: float | None = Field(default=None, gt=0)

    def read_options(self) -> ReadOptions:
        """Just these settings, out of a config that extends them (a source's)."""
        return ReadOptions.model_validate(self.model_dump(include=set(ReadOptions.model_fields)))

    def recipe(self) -> dict:
        """The settings that decide the pixels, as JSON (for fingerprints): how long the
        token service may take is left out, so a rerun with another budget redoes nothing."""
        return self.read_options().model_dump(mode="json", exclude={"sign_timeout_s"})

    @field_validator("profile")
    @classmethod
    def _known(cls, name: str | None) -> str | None:
        if name is not None:
            profile_named(name)
        return name


@dataclass(frozen=True)
class BandRead:
    """Where and how one model band is read from one item."""

    band: str
    asset: str
    #: 0-based band of the asset.
    index: int
    scale: float
    offset: float
    nodata: float | None


@dataclass(frozen=True)
class ItemRead:
    """An item's plan: the profile that applied, a :class:`BandRead` per model band, and
    the mask rule with the item's key for its asset (None: the item has no such asset)."""

    item: pystac.Item
    profile: SourceProfile
    bands: tuple[BandRead, ...]
    mask: MaskRule | None
    mask_asset: str | None
    signer: Signer | None
    #: The token service's budget (None: :func:`relaymap.ingest.signing.default_timeout_s`).
    sign_timeout_s: float | None = None

    @property
    def assets(self) -> tuple[str, ...]:
        """The keys of the assets the plan reads (its bands', then the mask's): the only
        ones signed."""
        keys = [b.asset for b in self.bands] + [self.mask_asset] * (self.mask_asset is not None)
        return tuple(dict.fromkeys(keys))

    @property
    def reflectance(self) -> bool:
        """Reflectance-like values (scale 1e-4 and the like), stored as scaled integers."""
        return all(b.scale < 0.01 for b in self.bands)


def band_meta(asset: pystac.Asset) -> list[dict]:
    """An asset's per-band metadata: STAC 1.1 ``bands``, or ``eo:bands`` merged with
    ``raster:bands`` by position."""
    fields = asset.extra_fields
    if fields.get("bands"):
        return list(fields["bands"])
    eo, raster = fields.get("eo:bands") or [], fields.get("raster:bands") or []
    return [
        {**(raster[i] if i < len(raster) else {}), **(eo[i] if i < len(eo) else {})}
        for i in range(max(len(eo), len(raster)))
    ]


def asset_key(item: pystac.Item, key: str) -> str | None:
    """The item's key for asset ``key``: exact, else the one that differs only in case."""
    if key in item.assets:
        return key
    folded = [k for k in item.assets if k.casefold() == key.casefold()]
    return folded[0] if len(folded) == 1 else None


def _names(meta: dict) -> set[str]:
    return {
        str(n).casefold()
        for n in (meta.get("name"), meta.get("common_name"), meta.get("eo:common_name"))
        if n
    }


def _candidates(item: pystac.Item, name: str) -> list[tuple[str, int]]:
    """``(asset, index)`` of every band an item names ``name``: the asset of that key (one
    band), or bands whose name or common name it is."""
    key = asset_key(item, name)
    if key is not None and len(band_meta(item.assets[key])) <= 1:
        return [(key, 0)]
    found = []
    for k, asset in item.assets.items():
        if "visual" in (asset.roles or []) or "overview" in (asset.roles or []):
            continue  # 8-bit renderings of the same bands
        found += [(k, i) for i, m in enumerate(band_meta(asset)) if name.casefold() in _names(m)]
    return found


def _explicit(item: pystac.Item, band: str, spec: str) -> tuple[str, int]:
    """``asset`` or ``asset:band`` (1-based number or band name) of a band map."""
    key_part, _, band_part = spec.partition(":")
    key = asset_key(item, key_part)
    if key is None:
        raise MissingAssetError(
            f"item {item.id}: the band map gives {band}={spec}, but the item has no asset "
            f"{key_part!r}; it has {', '.join(sorted(item.assets))}"
        )
    meta = band_meta(item.assets[key])
    if not band_part:
        return key, 0
    if band_part.isdigit() and int(band_part) >= 1:
        return key, int(band_part) - 1
    for i, m in enumerate(meta):
        if band_part.casefold() in _names(m):
            return key, i
    raise MissingAssetError(
        f"item {item.id}: asset {key!r} has no band {band_part!r} (from the band map "
        f"{band}={spec}); its bands: {', '.join(_label(key, i, m) for i, m in enumerate(meta))}"
    )


def _label(key: str, index: int, meta: dict) -> str:
    name = meta.get("name") or meta.get("common_name")
    return f"{key}:{index + 1}" + (f" ({name})" if name else "")


def _locate(item: pystac.Item, band: str, profile: SourceProfile, options: ReadOptions):
    if band in options.band_map:
        return _explicit(item, band, options.band_map[band])
    names = [profile.bands[band], band] if band in profile.bands else [band]
    for name in names:
        found = _candidates(item, name)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            listed = ", ".join(_label(k, i, band_meta(item.assets[k])[i]) for k, i in found)
            raise AmbiguousBandError(
                f"item {item.id}: {len(found)} bands could be the model's {band!r}: {listed}; "
                f"choose one with --band {band}={found[0][0]}:{found[0][1] + 1} (or band_map: "
                f"{{{band}: ...}} in the config)"
            )
    tried = " or ".join(repr(n) for n in names)
    raise MissingAssetError(
        f"item {item.id} has no band {band!r}: no asset or eo:bands name/common name {tried}"
        f" (profile {profile.name}); it has {', '.join(sorted(item.assets))}; map one with "
        f"--band {band}=ASSET[:BAND]"
    )


def _encoding(
    item: pystac.Item, band: str, meta: dict, profile: SourceProfile, options: ReadOptions
) -> tuple[float, float, float | None]:
    """``(scale, offset, nodata)``: the user's, else the metadata's, else the profile's."""
    scale = options.scale.get(band, options.scale.get("*"))
    if scale is None:
        scale = meta.get("scale", profile.scale if profile.scale is not None else 1.0)
    offset = options.offset.get(band, options.offset.get("*"))
    if offset is None:
        offset = meta.get("offset")
    if offset is None and profile.s2_baseline_offset:
        baseline = item.properties.get("s2:processing_baseline")
        if baseline and float(baseline) >= 4.0:  # DN = 10000 * reflectance + 1000
            offset = -1000.0 * float(scale)
    if offset is None:
        offset = profile.offset if profile.offset is not None else 0.0
    nodata = meta.get("nodata", profile.nodata)
    return float(scale), float(offset), None if nodata is None else float(nodata)


def plan_read(
    item: pystac.Item, bands: Sequence[str], options: ReadOptions | None = None
) -> ItemRead:
    """How ``item`` gives each of ``bands`` (model band names), checked without reading
    pixels.

    Raises:
        MissingAssetError: a band the item does not have (the message says how to map one).
        AmbiguousBandError: two or more bands of the item could be one model band.
    """
    options = options or ReadOptions()
    profile = choose_profile(item, options.profile)
    reads = []
    for band in bands:
        key, index = _locate(item, band, profile, options)
        meta = band_meta(item.assets[key])
        info = meta[index] if index < len(meta) else {}
        reads.append(BandRead(band, key, index, *_encoding(item, band, info, profile, options)))
    taken = {(r.asset, r.index): r.band for r in reads}
    if len(taken) < len(reads):
        dup = next(r for r in reads if taken[(r.asset, r.index)] != r.band)
        other = taken[(dup.asset, dup.index)]
        raise AmbiguousBandError(
            f"item {item.id}: bands {dup.band!r} and {other!r} both read "
            f"{dup.asset}:{dup.index + 1}; map them apart with --band"
        )
    mask = profile.mask if options.mask == "auto" else options.mask
    key = asset_key(item, mask.asset) if mask is not None else None
    signer = signer_of(item, options)
    return ItemRead(item, profile, tuple(reads), mask, key, signer, options.sign_timeout_s)


def signer_of(item: pystac.Item, options: ReadOptions | None = None) -> Signer | None:
    """How ``item``'s hrefs are signed: the option's signer, none, or its profile's."""
    options = options or ReadOptions()
    if options.sign == "none":
        return None
    if options.sign == "auto":
        return choose_profile(item, options.profile).signer
    return options.sign

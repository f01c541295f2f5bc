"""STAC items for relaymap's products: land-cover map COGs and trained models (MLM).

Extensions through pystac's classes where they exist (projection, raster, classification,
file, eo); the model's MLM fields through ``stac-model``, the MLM project's own pydantic
models (0.6.1 writes MLM 1.5.2); ``processing`` fields are written by hand (pystac has no class
for them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from typing import Annotated, Any

import pystac
import rasterio
from odc.geo.geobox import GeoBox
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from stac_model.base import OmitIfNone
from stac_model.input import InputStructure, ModelInput, ValueScalingZScore
from stac_model.output import MLMClassification, ModelOutput, ModelResult
from stac_model.schema import MLModelExtension, MLModelProperties

from relay_models.spec import DataSpec

from .storage import filesystem, gdal_env, normalize_url, read_bytes

PROCESSING_SCHEMA = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
#: Classification 1.1 (what MLM 1.4/1.5 validate their classes against; every class has a
#: ``value``, ``name`` and ``description``). pystac's class writes 2.0.
CLASSIFICATION_SCHEMA = "https://stac-extensions.github.io/classification/v1.1.0/schema.json"
COG_TYPE = pystac.MediaType.COG
SAFETENSORS_TYPE = "application/octet-stream; application=safetensors"
ZARR_TYPE = "application/vnd+zarr"
#: What ``relay_models.save_model`` writes (MLM's name for the artifact's format).
SAFETENSORS_ARTIFACT = "safetensors.torch.save_file"


def multihash_sha256(url: str, chunk_bytes: int = 1 << 22) -> tuple[int, str]:
    """``(size, multihash)`` of an object, streamed (``file:checksum`` wants a multihash:
    ``1220`` = sha2-256, 32 bytes, then the hex digest)."""
    fs, path = filesystem(url)
    h, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
            size += len(chunk)
    return size, "1220" + h.hexdigest()


def _footprint(gbox: GeoBox) -> tuple[dict, list[float]]:
    geom = gbox.extent.to_crs("EPSG:4326")
    return geom.json, list(geom.boundingbox)


def read_item(url: str) -> pystac.Item:
    """The STAC item whose JSON is at ``url`` (any storage URL), its self href set.

    Raises:
        FileNotFoundError: nothing at ``url``.
        ValueError: the JSON there is not a STAC item (the message names ``url``).
    """
    try:
        return pystac.Item.from_dict(json.loads(read_bytes(url)), href=url, migrate=False)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{url} is not a STAC item: {e}") from None


def class_list(classes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``classification:classes`` (1.1) from ``{"index", "name", "color_hint"?,
    "description"?}`` mappings: the value in a map is the class index; every class gets a
    description (its name when it has none)."""
    out = []
    for c in classes:
        d = {
            "value": int(c["index"]),
            "name": str(c["name"]),
            "description": str(c.get("description") or c["name"]),
        }
        if c.get("color_hint"):
            d["color_hint"] = str(c["color_hint"]).lstrip("#").upper()
        out.append(d)
    return out


def add_classes(target: pystac.Item | pystac.Asset, classes: Sequence[Mapping[str, Any]]) -> None:
    """Write ``classification:classes`` on an asset (or item) and declare the extension."""
    target.extra_fields["classification:classes"] = class_list(classes)
    item = target.owner if isinstance(target, pystac.Asset) else target
    if isinstance(item, pystac.Item | pystac.Collection) and (
        CLASSIFICATION_SCHEMA not in item.stac_extensions
    ):
        item.stac_extensions.append(CLASSIFICATION_SCHEMA)


def _software() -> dict[str, str]:
    return {"relaymap": version("relaymap")}


def map_item(
    cog_url: str,
    *,
    item_id: str,
    collection: str,
    classes: Sequence[Mapping[str, Any]],
    sources: Sequence[tuple[str, str]],
    model_item: pystac.Item | None = None,
    datetime: dt.datetime | None = None,
    probabilities_url: str | None = None,
    quicklook_url: str | None = None,
) -> pystac.Item:
    """A land-cover map item for a uint8 class COG.

    Reads the COG's grid (``proj:*``), band info, size and checksum; links the item
    ``derived_from`` the source items and the model item (by their self hrefs).

    Args:
        cog_url: the class COG (any URL rasterio/fsspec read).
        item_id: the item's id (stable across reruns: it is the upsert key).
        collection: the map collection id.
        classes: ``{"index", "name", "color_hint"}`` per class.
        sources: ``(item id, self href)`` of the imagery items the map was made from (a
            scene store records them); an empty href links by id.
        model_item: the model's MLM item.
        datetime: the map's nominal time (default: now).
        probabilities_url: optional per-class probability COG.
        quicklook_url: optional PNG overview.
    """
    cog_url = normalize_url(cog_url)
    with rasterio.Env(**gdal_env()), rasterio.open(cog_url) as src:
        gbox = GeoBox((src.height, src.width), src.transform, src.crs)
        dtype, nodata, res = src.dtypes[0], src.nodata, abs(src.transform.a)
        epsg = src.crs.to_epsg()
    geometry, bbox = _footprint(gbox)
    item = pystac.Item(
        item_id, geometry, bbox, datetime or dt.datetime.now(dt.UTC), {}, collection=collection
    )
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.code = f"EPSG:{epsg}" if epsg else None
    if not epsg:
        proj.wkt2 = gbox.crs.to_wkt()
    proj.shape = list(gbox.shape)
    proj.transform = list(gbox.transform)[:6]
    proj.bbox = list(gbox.boundingbox)
    item.stac_extensions.append(PROCESSING_SCHEMA)
    item.properties.update(
        {
            "processing:level": "L4",
            "processing:software": _software(),
            "processing:datetime": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        }
    )
    asset = pystac.Asset(cog_url, title="land-cover classes", media_type=COG_TYPE, roles=["data"])
    item.add_asset("classes", asset)
    RasterExtension.ext(asset, add_if_missing=True).bands = [
        RasterBand.create(data_type=DataType(dtype), nodata=nodata, spatial_resolution=res)
    ]
    add_classes(asset, classes)
    _add_file_info(asset)
    if probabilities_url:
        prob = pystac.Asset(
            normalize_url(probabilities_url),
            title="class probabilities x 255",
            media_type=COG_TYPE,
            roles=["data"],
        )
        item.add_asset("probabilities", prob)
        _add_file_info(prob)
    if quicklook_url:
        item.add_asset(
            "overview",
            pystac.Asset(
                normalize_url(quicklook_url),
                title="quicklook with legend",
                media_type=pystac.MediaType.PNG,
                roles=["thumbnail", "overview"],
            ),
        )
    for src_id, href in sources:
        item.add_link(
            pystac.Link(
                "derived_from", href or src_id, media_type=pystac.MediaType.GEOJSON, title=src_id
            )
        )
    if model_item is not None:
        item.add_link(
            pystac.Link(
                "derived_from",
                model_item.get_self_href() or model_item.id,
                media_type=pystac.MediaType.GEOJSON,
                title=f"model {model_item.id}",
            )
        )
    return item


def _add_file_info(asset: pystac.Asset) -> None:
    size, checksum = multihash_sha256(asset.href)
    file_ext = FileExtension.ext(asset, add_if_missing=True)
    file_ext.size = size
    file_ext.checksum = checksum


class _ModelInput(ModelInput):
    """stac-model's input with MLM's optional ``description`` (0.6.1 drops it)."""

    description: Annotated[str | None, OmitIfNone] = None


class _ModelOutput(ModelOutput):
    """stac-model's output with MLM's optional ``description`` (0.6.1 drops it)."""

    description: Annotated[str | None, OmitIfNone] = None


class _ModelProperties(MLModelProperties):
    """stac-model's item fields with ``mlm:hyperparameters`` (0.6.1 has no field for it)."""

    hyperparameters: Annotated[dict[str, Any] | None, OmitIfNone] = None


def _training_links(training_data: Sequence[tuple[str, str, Sequence[str]]]) -> list[pystac.Link]:
    """``derived_from`` links to the scene stores the model learnt from: exactly its data,
    and as lasting as the run's outputs (a source API may be gone; each store records its
    source items, named in the title)."""
    links, seen = [], set()
    for role, store_url, ids in training_data:
        store_url = normalize_url(store_url)
        if store_url not in seen:
            seen.add(store_url)
            title = f"{role} data: scene store" + (f" of {', '.join(ids)}" if ids else "")
            links.append(pystac.Link("derived_from", store_url, ZARR_TYPE, title))
    return links


def model_item(
    weights_url: str,
    *,
    item_id: str,
    collection: str,
    spec: DataSpec,
    model_name: str,
    architecture: str,
    total_parameters: int,
    hyperparameters: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    training_data: Sequence[tuple[str, str, Sequence[str]]] = (),
    geometry: dict | None = None,
    bbox: Sequence[float] | None = None,
    datetime: dt.datetime | None = None,
    pretrained_source: str | None = None,
) -> pystac.Item:
    """A STAC MLM item (MLM 1.5.2, built with ``stac-model``) for a trained relay-token model
    and its safetensors weights; inputs, normalisation and classes come from the data ``spec``.

    Inputs are the local and global windows (``(B, C, L, L)`` float32, z-scored per band
    with the training stores' statistics); the output is ``(B, K, L, L)`` class logits.

    Args:
        weights_url: the safetensors file (``relay_models.save_model``).
        item_id: the item's id.
        collection: the model collection id.
        spec: the model's data contract (bands, mean and std, classes, window size).
        model_name: registered model name (``mlm:name``).
        architecture: backbone description (``mlm:architecture``).
        total_parameters: number of parameters.
        hyperparameters: training options (``mlm:hyperparameters``); a true ``pretrained``
            sets ``mlm:pretrained``.
        metrics: final training metrics (``relaymap:metrics``).
        training_data: ``(role, store URL, source item ids)`` per scene store (role:
            ``"training"`` or ``"validation"``), linked ``derived_from``.
        geometry: the model's area of validity (default: the globe).
        bbox: its bbox ``(minx, miny, maxx, maxy)`` in lon/lat.
        datetime: the item's time (default: now).
        pretrained_source: the checkpoint training started from (``mlm:pretrained_source``;
            a URL without its query), if any.
    """
    classes = spec.class_table()
    window_px = spec.window_px
    output = _ModelOutput(
        name="classes",
        tasks={"semantic-segmentation"},
        result=ModelResult(
            shape=[-1, len(classes), window_px, window_px],
            dim_order=["batch", "channel", "height", "width"],
            data_type="float32",
        ),
        classes=[MLMClassification(**c) for c in class_list(classes)],
        description="class logits of the local window; argmax gives the class index",
    )
    if pretrained_source is None and (hyperparameters or {}).get("pretrained"):
        pretrained_source = ""  # pretrained, the source not recorded
    item = _mlm_item(
        weights_url,
        item_id=item_id,
        collection=collection,
        spec=spec,
        model_name=model_name,
        architecture=architecture,
        total_parameters=total_parameters,
        output=output,
        hyperparameters=hyperparameters,
        pretrained_source=pretrained_source,
        training_data=training_data,
        geometry=geometry,
        bbox=bbox,
        datetime=datetime,
    )
    # mlm:output carries classification:classes objects: declare the extension they follow
    item.stac_extensions.append(CLASSIFICATION_SCHEMA)
    if metrics:
        item.properties["relaymap:metrics"] = {k: float(v) for k, v in metrics.items()}
    return item


def backbone_item(
    weights_url: str,
    *,
    item_id: str,
    collection: str,
    spec: DataSpec,
    model_name: str,
    architecture: str,
    total_parameters: int,
    features: tuple[int, int],
    pretrained_source: str,
    hyperparameters: Mapping[str, Any] | None = None,
    training_data: Sequence[tuple[str, str, Sequence[str]]] = (),
) -> pystac.Item:
    """A STAC MLM item for a pretrained backbone (``relaymap pretrain``): a timm-format
    checkpoint that ``pretrained:`` accepts, whose output is features, not classes.

    Args:
        features: ``(channels, reduction)`` of the last stage's feature map.
        pretrained_source: how it was pretrained (``mlm:pretrained_source``), e.g. the
            method and the unlabelled stores.
        others: as :func:`model_item` (``spec``: bands and normalisation of the pretraining
            data; its classes are not used).
    """
    channels, reduction = features
    side = spec.window_px // reduction
    output = _ModelOutput(
        name="features",
        tasks={"semantic-segmentation"},
        result=ModelResult(
            shape=[-1, channels, side, side],
            dim_order=["batch", "channel", "height", "width"],
            data_type="float32",
        ),
        description=f"last-stage features (1/{reduction} of the window side) of a backbone "
        "to fine-tune for segmentation; no classes",
    )
    return _mlm_item(
        weights_url,
        item_id=item_id,
        collection=collection,
        spec=spec,
        model_name=model_name,
        architecture=architecture,
        total_parameters=total_parameters,
        output=output,
        hyperparameters=hyperparameters,
        pretrained_source=pretrained_source,
        training_data=training_data,
    )


def _mlm_item(
    weights_url: str,
    *,
    item_id: str,
    collection: str,
    spec: DataSpec,
    model_name: str,
    architecture: str,
    total_parameters: int,
    output: ModelOutput,
    hyperparameters: Mapping[str, Any] | None,
    pretrained_source: str | None,
    training_data: Sequence[tuple[str, str, Sequence[str]]],
    geometry: dict | None = None,
    bbox: Sequence[float] | None = None,
    datetime: dt.datetime | None = None,
) -> pystac.Item:
    """The MLM item of a model or a backbone: its window inputs (from ``spec``), ``output``,
    weights asset with size and checksum, software and the stores it learnt from.
    ``pretrained_source`` None: trained from scratch (MLM's explicit null); "": pretrained,
    source not recorded."""
    weights_url = normalize_url(weights_url)
    bands, window_px, factor = list(spec.bands), spec.window_px, spec.factor
    geometry = geometry or {
        "type": "Polygon",
        "coordinates": [[[-180, -90], [180, -90], [180, 90], [-180, 90], [-180, -90]]],
    }
    item = pystac.Item(
        item_id,
        geometry,
        list(bbox or [-180, -90, 180, 90]),
        datetime or dt.datetime.now(dt.UTC),
        {},
        collection=collection,
    )
    # MLM: one value-scaling object per band, in band order
    scaling = [
        ValueScalingZScore(mean=float(m), stddev=float(s))
        for m, s in zip(spec.mean, spec.std, strict=True)
    ]
    window = InputStructure(
        shape=[-1, len(bands), window_px, window_px],
        dim_order=["batch", "bands", "height", "width"],
        data_type="float32",
    )
    inputs = [
        _ModelInput(
            name="local",
            bands=bands,
            input=window,
            value_scaling=scaling,
            description=f"{window_px} px window at full resolution",
        )
    ]
    if factor:
        inputs.append(
            _ModelInput(
                name="global",
                bands=bands,
                input=window,
                value_scaling=scaling,
                description=f"{factor * window_px} px window centred on the local one, "
                f"downsampled x{factor} to {window_px} px",
            )
        )
    properties = _ModelProperties(
        name=model_name,
        architecture=architecture,
        tasks={"semantic-segmentation"},
        input=inputs,
        output=[output],
        framework="pytorch",
        framework_version=version("torch"),
        accelerator=None,  # MLM: null = no specific accelerator required
        accelerator_constrained=False,
        accelerator_summary="CPU or CUDA GPU, chosen at run time",
        total_parameters=int(total_parameters),
        pretrained=pretrained_source is not None,
        hyperparameters=dict(hyperparameters) if hyperparameters else None,
    )
    MLModelExtension.ext(item, add_if_missing=True)  # declares the MLM 1.5.2 schema
    item.properties.update(properties.model_dump(mode="json", by_alias=True))
    if pretrained_source is None:  # MLM: a model trained from scratch says so with a null
        item.properties["mlm:pretrained_source"] = None
    elif pretrained_source:
        item.properties["mlm:pretrained_source"] = pretrained_source
    item.properties["processing:software"] = _software()
    item.stac_extensions.append(PROCESSING_SCHEMA)
    weights = pystac.Asset(
        weights_url,
        title="model weights",
        media_type=SAFETENSORS_TYPE,
        roles=["mlm:model", "mlm:weights", "data"],
        extra_fields={"mlm:artifact_type": SAFETENSORS_ARTIFACT},
    )
    item.add_asset("weights", weights)
    # the input bands, where MLM looks for the names its inputs refer to
    EOExtension.ext(weights, add_if_missing=True).bands = [Band.create(name=b) for b in bands]
    _add_file_info(weights)
    for link in _training_links(training_data):
        item.add_link(link)
    return item

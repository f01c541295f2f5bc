"""The ``relaymap`` command line."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import click
from pydantic import BaseModel

from relaymap.flows.change_command import change
from relaymap.flows.options import MapOptions
from relaymap.flows.serve import require_catalog, serve


class SettingsError(ValueError):
    """Bad settings, from flags or a config file: the message names every bad field."""


#: Exit codes: 0 done, 1 some work failed (the rest is kept), 2 bad input (one line, nothing
#: written), 3 nothing to map (no source imagery in the area for any period).
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NO_IMAGERY = 1, 2, 3


def _typed_errors() -> tuple[type[Exception], ...]:
    """The errors that mean bad input or an unreachable service, not a bug."""
    from relay_models import WeightsError
    from relay_models.saved import SavedModelError
    from relaymap.catalog import CatalogError, ItemNotFound, StorageError, UnsafeIdError
    from relaymap.flows.jobs import RayJobError, RayStartError
    from relaymap.flows.raytrain import RunConflictError
    from relaymap.flows.trained import ModelError
    from relaymap.ingest import IngestError

    return (
        IngestError,
        CatalogError,
        ItemNotFound,
        StorageError,
        UnsafeIdError,
        ModelError,
        SavedModelError,
        WeightsError,
        RayJobError,
        RayStartError,
        RunConflictError,
        SettingsError,
    )


def settings(config_cls: type[BaseModel], data: dict[str, Any], where: str = "") -> Any:
    """``config_cls`` validated from ``data`` (a config file's mapping with the flags given
    merged in), or a :class:`SettingsError` naming every bad field on one line, the same
    for a key in ``--config`` and for a flag."""
    from pydantic import ValidationError

    try:
        return config_cls.model_validate(data)
    except ValidationError as e:
        raise SettingsError(f"{where or 'invalid settings'}: {describe(e)}") from None


def describe(error: Any) -> str:
    """A pydantic ``ValidationError`` on one line: ``field.path: problem`` per error."""
    parts = []
    for err in error.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(the whole config)"
        msg = {"extra_forbidden": "unknown key", "missing": "required"}.get(err["type"])
        if msg is None:
            value = err.get("input")
            got = f" (got {value!r})" if isinstance(value, str | int | float | bool) else ""
            msg = err["msg"][0].lower() + err["msg"][1:] + got
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def read_config(path: str | None) -> dict[str, Any]:
    """A config file's mapping, validated later together with the flags (see
    :func:`settings`); ``{}`` without a file."""
    import yaml

    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SettingsError(f"cannot read config {path}: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"config {path}: expected a YAML mapping, got {type(data).__name__}")
    return data


#: ``--address``, of every command that runs on Ray.
ADDRESS = click.option(
    "--address",
    default=None,
    help="Ray cluster to run on (host:port or ray://...); default: local Ray, or the cluster "
    "RAY_ADDRESS names.",
)

#: Options taking a lon/lat box: written ``W,S,E,N`` (as ``--area``) or, still, ``W S E N``.
BBOX_OPTIONS = ("--bbox",)


def _bbox_as_one(args: list[str]) -> list[str]:
    """``--bbox W S E N`` (four numbers, the old form) -> ``--bbox W,S,E,N``."""
    out, i = [], 0
    while i < len(args):
        out.append(args[i])
        if args[i] in BBOX_OPTIONS and _numbers(args[i + 1 : i + 5]):
            out.append(",".join(args[i + 1 : i + 5]))
            i += 5
            continue
        i += 1
    return out


def _numbers(values: list[str]) -> bool:
    try:
        return len(values) == 4 and all(isinstance(float(v), float) for v in values)
    except ValueError:
        return False


def parse_bbox(ctx: click.Context, param: click.Parameter, value: str | None):
    """``W,S,E,N`` in lon/lat -> a tuple of four floats (None when not given)."""
    from relaymap.ingest.grid import read_area

    if value is None:
        return None
    if value.count(",") != 3:
        raise click.BadParameter(f"{value!r}: give W,S,E,N in lon/lat, e.g. 15.0,43.3,15.2,43.4")
    return tuple(read_area(value).boundingbox)


class _Main(click.Group):
    """A typed error ends the command with one line (what failed, what to do) and exit code
    2 (3 when there is no imagery to map, 1 when local Ray would not start); ``-v`` shows
    the traceback instead."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _bbox_as_one(args))

    def invoke(self, ctx: click.Context):
        from relaymap.flows.jobs import RayStartError
        from relaymap.ingest import NoImageryError

        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # a bad flag: one line, with where to find help
            if e.ctx is None or e.ctx.parent is None:
                raise
            click.echo(
                f"relaymap: {e.format_message()} ({e.ctx.command_path} -h for help)", err=True
            )
            ctx.exit(EXIT_BAD_INPUT)
        except _typed_errors() as e:
            if ctx.params.get("verbose"):
                raise
            lines = str(e).strip().splitlines() or [""]
            more = " (-v for details)" if len(lines) > 1 else ""
            click.echo(f"relaymap: {type(e).__name__}: {lines[0]}{more}", err=True)
            if isinstance(e, NoImageryError):
                ctx.exit(EXIT_NO_IMAGERY)
            ctx.exit(EXIT_FAILED if isinstance(e, RayStartError) else EXIT_BAD_INPUT)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="relaymap")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level; tracebacks on errors.")
def main(verbose: bool) -> None:
    """relaymap: land-cover maps from Earth-observation imagery with relay-token transformers."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:  # a quiet console: stages and progress bars, no orchestration chatter
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for name in ("ray", "ray.data", "ray.train", "prefect", "distributed"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    # a service that is down is one error line, not a warning per retry first
    logging.getLogger("urllib3").setLevel(logging.INFO if verbose else logging.ERROR)
    logging.getLogger("relaymap").setLevel(logging.INFO if verbose else logging.WARNING)


@main.command()
@click.argument("pattern", default="*")
@click.option("--flops", is_flag=True, help="Also count forward GFLOPs (torch flop counter).")
@click.option("--side-px", default=256, show_default=True, help="Window side for --flops.")
@click.option("--num-classes", default=10, show_default=True, help="Classes K of the head.")
def models(pattern: str, flops: bool, side_px: int, num_classes: int) -> None:
    """List registered models matching PATTERN (shell-style) with their parameter counts.

    Relay-token variants show their overhead over the sliding-window baseline; with
    --flops, GFLOPs are per forward pass on one window (pair) of SIDE_PX pixels.

    \b
    Example:
      relaymap models 'swinv2_*_relay' --flops
    """
    from relay_models import list_models, model_stats, split_name
    from relay_models.stats import ModelStats

    names = list_models(pattern)
    if not names:
        raise click.BadParameter(
            f"no model matches {pattern!r}; try 'relaymap models' for all", param_hint="PATTERN"
        )
    head = f"{'model':<24}{'params (M)':>12}{'vs base':>9}"
    if flops:
        head += f"{'GFLOPs @' + str(side_px):>14}{'vs base':>9}"
    click.echo(head)
    stats: dict[str, ModelStats] = {}
    for name in names:
        base = split_name(name)[0]
        for n in (base, name):
            if n not in stats:
                stats[n] = model_stats(n, num_classes=num_classes, side_px=side_px, flops=flops)
        s, b = stats[name], stats[base]
        row = f"{name:<24}{s.params / 1e6:>12.2f}{s.params / b.params - 1:>+9.1%}"
        if flops:
            row += f"{s.gflops:>14.2f}{s.gflops / b.gflops:>8.2f}x"
        click.echo(row)


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@ADDRESS
@click.option(
    "--pretrained",
    default=None,
    help="Backbone weights, overriding the config's model.pretrained: a path, an fsspec URL, "
    "hf-hub:ORG/NAME[@REVISION], a timm NAME.TAG or an MLM item (.json); fetched once into "
    "the Hugging Face cache.",
)
def train(config: str, address: str | None, pretrained: str | None) -> None:
    """Train (or resume) the run described by CONFIG, a YAML file (see relaymap.flows.train).

    \b
    Example:
      relaymap train run.yaml --address head:6379
      relaymap train run.yaml --pretrained swinv2_tiny_window8_256.ms_in1k
    """
    from relaymap.flows.train import TrainConfig, check_pretrained
    from relaymap.flows.train import train as run_training

    data = read_config(config)
    if pretrained is not None:
        model = data.get("model")
        data["model"] = {**model, "pretrained": pretrained} if isinstance(model, dict) else model
    cfg = settings(TrainConfig, data, config)
    report = check_pretrained(cfg)  # before any compute: fetched, verified, loaded strictly
    if report is not None:
        click.echo(report.summary())
    result = run_training(cfg, address=address)
    click.echo(f"weights: {result.weights_url}")
    click.echo(
        f"model item: {result.model_item.id} "
        f"({result.model_item.get_self_href() or 'not registered'})"
    )
    if "val_miou" in result.metrics:
        click.echo(f"validation mIoU: {result.metrics['val_miou']:.3f}")


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@ADDRESS
def pretrain(config: str, address: str | None) -> None:
    """Pretrain (or resume) a backbone on unlabelled scene stores, as CONFIG (a YAML file,
    see relaymap.flows.pretrain) says; writes a checkpoint that `train` takes as
    `pretrained:`.

    \b
    Example:
      relaymap pretrain pretrain.yaml
      relaymap train run.yaml --pretrained runs/pretrain-1/backbone.safetensors
    """
    from relaymap.flows.pretrain import PretrainConfig
    from relaymap.flows.pretrain import pretrain as run_pretraining

    cfg = settings(PretrainConfig, read_config(config), config)
    result = run_pretraining(cfg, address=address)
    click.echo(f"backbone: {result.weights_url}")
    where = result.item.get_self_href() or "not registered"
    click.echo(f"backbone item: {result.item.id} ({where})")
    if "loss" in result.metrics:
        click.echo(f"final reconstruction loss: {result.metrics['loss']:.4f}")


def options_of(config_cls: type[BaseModel]) -> Callable:
    """Click options made from a pydantic config's fields (``--tile-px``, ``--quicklook/
    --no-quicklook`` ...), each defaulting to None (unset: the config's own default)."""

    def decorate(f: Callable) -> Callable:
        for name, field in reversed(config_cls.model_fields.items()):
            flag = "--" + name.replace("_", "-")
            kind = field.annotation
            if get_origin(kind) in (Union, UnionType):  # X | None -> X
                kind = next(a for a in get_args(kind) if a is not type(None))
            help_ = field.description + (
                "" if field.default is None else f" [default: {field.default}]"
            )
            if kind is bool:
                f = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_)(f)
            elif get_origin(kind) is Literal:
                choice = click.Choice(get_args(kind))
                f = click.option(flag, name, type=choice, default=None, help=help_)(f)
            else:
                f = click.option(flag, name, type=kind, default=None, help=help_)(f)
        return f

    return decorate


@main.command()
@click.option("--model", "model", default=None, help="Weights (.safetensors) or MLM item (.json).")
@click.option("--scene", default=None, help="Scene store URL (file://, s3://, or a path).")
@click.option(
    "--out", default=None, help="Output prefix; products go to OUT/<item id>/<generation>/."
)
@click.option("--catalog", default=None, help="Static catalog URL or STAC API to register in.")
@click.option("--collection", default=None, help="Map collection [default: relaymap-maps].")
@click.option("--item-id", default=None, help="Map item id (default: <scene>-<model>).")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="An InferConfig YAML (relaymap.flows.infer); flags given as well override its values.",
)
@ADDRESS
@options_of(MapOptions)
def infer(config_file: str | None, address: str | None, **flags) -> None:
    """Map a scene store with a trained model: class COG, probabilities, quicklook, STAC item.

    \b
    Example:
      relaymap infer --model runs/run-1/model.safetensors --scene scenes/a.zarr \\
          --out maps --catalog catalog --overlap-px 32 --probabilities
    """
    from relaymap.flows.infer import InferConfig
    from relaymap.flows.infer import infer as run_inference

    base = read_config(config_file)
    given = {k: v for k, v in flags.items() if v is not None}
    options = {k: given.pop(k) for k in list(given) if k in MapOptions.model_fields}
    data = {**base, **given, "options": {**(base.get("options") or {}), **options}}
    cfg = settings(InferConfig, data, config_file or "")
    product = run_inference(cfg, address=address)
    click.echo(f"classes: {product.classes_url}")
    for label, url in (
        ("probabilities", product.probabilities_url),
        ("quicklook", product.quicklook_url),
    ):
        if url:
            click.echo(f"{label}: {url}")
    click.echo(
        f"item: {product.item.id} ({product.item.get_self_href() or 'not registered'}); "
        f"{product.tiles} tiles ({product.skipped} without data) in {product.seconds:.1f} s"
    )


def read_flags(f: Callable) -> Callable:
    """The flags that say how a source's items become the model's bands (a source profile
    and overrides, :class:`relaymap.ingest.profiles.ReadOptions`), for ``map`` and
    ``ingest``."""
    from relaymap.ingest.profiles import profile_names

    for option in reversed(
        [
            click.option(
                "--profile",
                type=click.Choice(profile_names()),
                default=None,
                help="Source profile [default: chosen from each item's metadata].",
            ),
            click.option(
                "--band",
                "band_map",
                multiple=True,
                metavar="BAND=ASSET[:N]",
                help="Which asset (and band, 1-based or by name) gives a model band; repeatable.",
            ),
            click.option(
                "--scale",
                "scales",
                multiple=True,
                metavar="[BAND=]VALUE",
                help="Scale of a band (or of all) whose metadata has none; repeatable.",
            ),
            click.option(
                "--offset",
                "offsets",
                multiple=True,
                metavar="[BAND=]VALUE",
                help="Offset of a band (or of all): physical = DN * scale + offset.",
            ),
            click.option("--mask-asset", default=None, help="Cloud mask asset [the profile's]."),
            click.option(
                "--mask-values", default=None, metavar="V,V,...", help="Mask classes not clear."
            ),
            click.option(
                "--mask-bits", default=None, metavar="B,B,...", help="Mask bits set = not clear."
            ),
            click.option("--no-mask", is_flag=True, default=None, help="Load without a mask."),
            click.option(
                "--sign",
                type=click.Choice(["auto", "none", "planetary-computer"]),
                default=None,
                help="Sign hrefs with Planetary Computer's token service, or not (none: "
                "public copies, your own storage, or offline) [default: auto, as the "
                "profile says]. Its time budget: RELAYMAP_SIGN_TIMEOUT_S [30 s].",
            ),
        ]
    ):
        f = option(f)
    return f


def read_settings(flags: dict[str, Any]) -> dict[str, Any]:
    """The read flags given (popped from ``flags``) as ReadOptions fields."""
    out: dict[str, Any] = {}
    if (profile := flags.pop("profile", None)) is not None:
        out["profile"] = profile
    if (sign := flags.pop("sign", None)) is not None:
        out["sign"] = sign
    bands = dict(_pair(v, "--band", need_key=True) for v in flags.pop("band_map", ()) or ())
    scale = dict(_pair(v, "--scale", number=True) for v in flags.pop("scales", ()) or ())
    offset = dict(_pair(v, "--offset", number=True) for v in flags.pop("offsets", ()) or ())
    given = (("band_map", bands), ("scale", scale), ("offset", offset))
    out.update({k: v for k, v in given if v})
    asset = flags.pop("mask_asset", None)
    values, bits = flags.pop("mask_values", None), flags.pop("mask_bits", None)
    if flags.pop("no_mask", None):
        out["mask"] = None
    elif asset or values or bits:
        if not asset:
            raise click.BadParameter("give the mask's asset too", param_hint="--mask-asset")
        out["mask"] = {"asset": asset, "values": _ints(values), "bits": _ints(bits)}
    return out


def _pair(value: str, flag: str, *, need_key: bool = False, number: bool = False):
    key, sep, val = value.rpartition("=")
    if not sep:
        if need_key:
            raise click.BadParameter(f"{value!r}: write BAND=ASSET[:N]", param_hint=flag)
        key = "*"
    if number:
        try:
            return key, float(val)
        except ValueError:
            raise click.BadParameter(
                f"{value!r}: {val!r} is not a number", param_hint=flag
            ) from None
    return key, val


def _ints(text: str | None) -> list[int]:
    try:
        return [int(v) for v in text.split(",")] if text else []
    except ValueError:
        raise click.BadParameter(f"{text!r}: give integers, comma-separated") from None


@main.command(name="map")
@read_flags
@click.option("--area", default=None, help="GeoJSON polygon file/URL, or W,S,E,N in lon/lat.")
@click.option("--period", default=None, help="START/END (2026-01/2026-06), one period, or last.")
@click.option(
    "--every", type=click.Choice(["month", "week", "day"]), default=None, help="[default: month]"
)
@click.option("--model", default=None, help="Weights (.safetensors) or MLM item (.json).")
@click.option("--source", default=None, help="STAC API with the imagery.")
@click.option("--collection", "collections", multiple=True, help="Source collection; repeatable.")
@click.option("--max-cloud", type=float, default=None, help="Skip items above this cloud cover %.")
@click.option(
    "--composite", type=click.Choice(["best", "median"]), default=None, help="[default: best]"
)
@click.option("--out", default=None, help="Products go to OUT/<map collection>/<period>/.")
@click.option("--catalog", default=None, help="Static catalog or STAC API [default: OUT/catalog].")
@click.option("--map-collection", default=None, help="Collection of the maps [relaymap-area].")
@click.option("--resolution", type=float, default=None, help="Metres [default: the model's].")
@click.option("--cell-px", type=int, default=None, help="Grid cell side in pixels [1536].")
@click.option("--crs", default=None, help="Grid CRS [default: UTM zone of the area].")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="An AreaConfig YAML (relaymap.flows.area); flags given as well override its values.",
)
@ADDRESS
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@options_of(MapOptions)
def map_(config_file: str | None, address: str | None, as_json: bool, **flags) -> None:
    """Map an area every period: cloud-free composites on a fixed grid, one seamless map
    per period (cell COGs + a VRT mosaic), class areas over time, all in STAC.

    \b
    Example:
      relaymap map --area aoi.geojson --period 2026-01/2026-06 --every month \\
          --model catalog/relaymap-models/items/landcover-v1.json \\
          --source https://earth-search.aws.element84.com/v1 --collection sentinel-2-l2a \\
          --out s3://bucket/maps
    """
    from relaymap.flows.area import AreaConfig, map_area

    base = read_config(config_file)
    f = {k: v for k, v in flags.items() if v is not None and v != ()}
    options = {k: f.pop(k) for k in list(f) if k in MapOptions.model_fields}
    read = read_settings(f)
    source = {
        k: v
        for k, v in {
            "stac_api": f.pop("source", None),
            "collections": list(f.pop("collections", [])) or None,
            "max_cloud_cover": f.pop("max_cloud", None),
        }.items()
        if v is not None
    } | read
    if "composite" in f:
        source["composite"] = {
            **((base.get("source") or {}).get("composite") or {}),
            "method": f.pop("composite"),
        }
    grid = {k: f.pop(k) for k in ("resolution", "cell_px", "crs") if k in f}
    if "map_collection" in f:
        f["collection"] = f.pop("map_collection")
    data = {
        **base,
        **f,
        "source": {**(base.get("source") or {}), **source},
        "grid": {**(base.get("grid") or {}), **grid},
        "options": {**(base.get("options") or {}), **options},
    }
    cfg = settings(AreaConfig, data, config_file or "")
    result = map_area(cfg, address=address, progress=not as_json)
    if as_json:
        click.echo(json.dumps(result.summary(), indent=1))
        if result.failed:
            raise SystemExit(1)
        return
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(
        f"{result.cells} cells x {len(result.periods)} periods: {len(result.mapped)} mapped, "
        f"{len(result.skipped)} unchanged, {len(result.nodata)} without clear pixels, "
        f"{len(result.failed)} failed ({result.seconds:.0f} s)"
    )
    for item_id, err in result.failed.items():
        click.echo(f"FAILED {item_id}: {err}")
    for pid, url in result.mosaics.items():
        click.echo(f"mosaic {pid}: {url}")
    for c in result.derived.get("changes", []):
        click.echo(f"change {c['from']} -> {c['to']}: {c['changed_km2']:.2f} km2, {c['mosaic']}")
    if result.collection is not None:
        click.echo(f"collection: {result.collection.get_self_href() or result.collection.id}")
    click.echo("")
    _table(
        result.rows,
        CLASS_AREA_COLUMNS,
    )
    if result.failed:
        raise SystemExit(1)


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
def pipeline(config: str) -> None:
    """Run mapping_pipeline with the parameters in CONFIG (YAML; see relaymap.flows.pipeline).

    \b
    Example:
      relaymap pipeline my-aoi.yaml
    """
    from relaymap.flows.pipeline import PipelineParams, mapping_pipeline

    params = settings(PipelineParams, read_config(config), config)
    click.echo(json.dumps(mapping_pipeline(params), indent=1, default=str))


@main.command()
@click.option("--workdir", default="relaymap-demo", show_default=True, help="Local folder.")
@click.option("--out", default=None, help="Where maps go (default: WORKDIR/maps; s3://...).")
@click.option("--steps", default=300, show_default=True, help="Training steps.")
def demo(workdir: str, out: str | None, steps: int) -> None:
    """Sample scenes and a cloudy area -> local STAC API -> train -> map the area monthly.

    \b
    Example:
      relaymap demo --workdir relaymap-demo --steps 300 && relaymap serve
    """
    import time

    from relaymap.flows.demo import run_demo

    t0 = time.perf_counter()
    res = run_demo(workdir, out_url=out, steps=steps)
    p = res.summary
    click.echo(f"\nrelaymap demo done in {time.perf_counter() - t0:.0f} s")
    click.echo(f"  workdir:    {res.workdir}")
    click.echo(f"  model:      {p['model']}")
    if "val_miou" in p.get("metrics", {}):
        click.echo(f"  validation mIoU: {p['metrics']['val_miou']:.3f}")
    click.echo(
        f"  area maps:  {len(p['mapped'])} cell maps made, {len(p['skipped'])} unchanged, "
        f"{len(p['nodata'])} without clear pixels"
    )
    for pid, url in p["mosaics"].items():
        click.echo(f"  mosaic {pid}: {url}")
    for c in p.get("changes", []):
        click.echo(f"  change {c['from']} -> {c['to']}: {c['changed_km2']:.2f} km2, {c['mosaic']}")
    click.echo(f"  catalog:    {res.catalog_url}/catalog.json\n")
    _table(
        p["class_areas"],
        CLASS_AREA_COLUMNS,
    )
    catalog = res.catalog_url.removeprefix("file://")
    click.echo(f"\nsee the maps in a browser:\n  relaymap serve {catalog} --port 8000")


#: The class-area table's columns (``relaymap map`` and ``relaymap demo``).
CLASS_AREA_COLUMNS = [
    ("period", "period", ""),
    ("class", "class", ""),
    ("area_km2", "area km2", ".2f"),
    ("low_confidence_km2", "low-confidence km2", ".2f"),
    ("observable_km2", "observable km2", ".2f"),
]


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` as a fixed-width table: ``(key, heading, format)`` per column."""
    widths = [max([len(h)] + [len(format(r[k], f)) for r in rows]) for k, h, f in columns]
    click.echo("  ".join(h.ljust(w) for (_, h, _), w in zip(columns, widths, strict=True)))
    for r in rows:
        cells = [format(r[k], f).ljust(w) for (k, _, f), w in zip(columns, widths, strict=True)]
        click.echo("  ".join(cells).rstrip())


@main.command()
@click.argument("stac_api")
@click.option("--collection", "collections", multiple=True, required=True, help="Repeatable.")
@click.option("--bbox", callback=parse_bbox, help="W,S,E,N in lon/lat (or W S E N).")
@click.option("--datetime", "when", default=None, help="RFC 3339 interval: 2024-06-01/2024-06-30")
@click.option("--max-cloud", type=float, default=None, help="Most eo:cloud_cover, percent.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def search(
    stac_api: str,
    collections: tuple[str, ...],
    bbox: tuple[float, float, float, float] | None,
    when: str | None,
    max_cloud: float | None,
    as_json: bool,
) -> None:
    """Search a STAC API: one row per item (id, datetime, cloud cover, footprint area).

    \b
    Example:
      relaymap search https://earth-search.aws.element84.com/v1 \\
          --collection sentinel-2-l2a --bbox 15.0,43.3,15.2,43.4 \\
          --datetime 2024-06-01/2024-06-30 --max-cloud 20
    """
    from pyproj import Geod
    from shapely.geometry import shape

    from relaymap.ingest import search as stac_search

    items = stac_search(
        stac_api, collections=collections, bbox=bbox, datetime=when, max_cloud_cover=max_cloud
    )
    geod = Geod(ellps="WGS84")
    rows = [
        {
            "id": it.id,
            "datetime": it.datetime.isoformat() if it.datetime else "",
            "cloud_cover": it.properties.get("eo:cloud_cover"),
            "footprint_km2": abs(geod.geometry_area_perimeter(shape(it.geometry))[0]) / 1e6
            if it.geometry
            else None,
        }
        for it in items
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        r["cloud"] = "-" if r["cloud_cover"] is None else f"{r['cloud_cover']:.0f}%"
        r["km2"] = "-" if r["footprint_km2"] is None else f"{r['footprint_km2']:,.1f}"
    _table(
        rows,
        [
            ("id", "id", ""),
            ("datetime", "datetime", ""),
            ("cloud", "cloud", ""),
            ("km2", "footprint km2", ""),
        ],
    )


@main.command()
@click.argument("stac_api")
@click.option("--collection", "collections", multiple=True, required=True, help="Repeatable.")
@click.option("--out", required=True, help="Stores go to OUT/<item id>.zarr (a path or URL).")
@click.option("--ids", default=None, help="Only these item ids, comma-separated.")
@click.option("--bbox", callback=parse_bbox, help="W,S,E,N in lon/lat (or W S E N).")
@click.option("--datetime", "when", default=None, help="RFC 3339 interval.")
@click.option(
    "--bands", default=None, help="In this order [default: the model's, else blue,green,red,nir]."
)
@click.option(
    "--resolution",
    type=float,
    default=None,
    help="Pixel size in the source's CRS units [default: the model's, else the source's].",
)
@click.option("--model", default=None, help="A model whose bands and pixel size to ingest for.")
@read_flags
@click.option("--label-asset", default=None, help="Asset with labels (default: none).")
@click.option(
    "--classes",
    default=None,
    help="Names of the label values 0..K-1, comma-separated, when the label asset does not "
    "list them (classification:classes).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ingest(
    stac_api: str,
    collections: tuple[str, ...],
    out: str,
    ids: str | None,
    bbox: tuple[float, float, float, float] | None,
    when: str | None,
    bands: str | None,
    resolution: float | None,
    model: str | None,
    label_asset: str | None,
    classes: str | None,
    as_json: bool,
    **read_flags_given,
) -> None:
    """STAC items -> one scene store each (levels, statistics; resumable, idempotent).

    With --resolution (or a --model, whose pixel size it takes), scenes are resampled:
    going coarser, the average of the valid pixels (labels: the majority of the labelled
    ones), nodata where fewer than half are valid; bilinear going finer. With --model, each
    item's values are checked against the model's before anything is written.

    \b
    Example:
      relaymap ingest http://localhost:8080 --collection relaymap-sample \\
          --ids sample-03,sample-04 --out scenes --label-asset labels
      relaymap ingest URL --collection wv2 --out scenes --model model.safetensors \\
          --band nir=image:7 --scale 0.0001
    """
    from tqdm.auto import tqdm

    from relaymap.catalog.storage import check_id, check_writable, join, normalize_url
    from relaymap.ingest import MissingAssetError, ingest_items
    from relaymap.ingest import search as stac_search
    from relaymap.ingest.load import signed
    from relaymap.ingest.pipeline import label_classes
    from relaymap.ingest.profiles import ReadOptions, plan_read

    read = settings(ReadOptions, read_settings(read_flags_given))
    if model is not None:
        from relaymap.flows.trained import read_info

        spec = read_info(model).spec
        bands = bands or ",".join(spec.bands)
        resolution = resolution or spec.pixel_size
    band_list = (bands or "blue,green,red,nir").split(",")
    items = stac_search(stac_api, collections=collections, bbox=bbox, datetime=when)
    if ids:
        wanted = ids.split(",")
        items = [it for it in items if it.id in wanted]
        missing = sorted(set(wanted) - {it.id for it in items})
        if missing:
            raise click.BadParameter(
                f"not found on {stac_api}: {', '.join(missing)}", param_hint="--ids"
            )
    names = classes.split(",") if classes else None
    # everything that can be checked without reading pixels, before the first store
    urls = [join(normalize_url(out), f"{check_id(it.id, 'STAC item id')}.zarr") for it in items]
    for it in items:
        asset = it.assets.get(label_asset or "")
        if asset and not names and not asset.extra_fields.get("classification:classes"):
            raise MissingAssetError(
                f"item {it.id}: label asset {label_asset!r} has no 'classification:classes'; "
                "name the label values 0..K-1 with --classes NAME,NAME,... or leave out "
                "--label-asset"
            )
        label_classes(it, label_asset, names)
        # every band found, none ambiguous; hrefs signed (a token service that cannot be
        # reached stops here, in one line)
        signed(plan_read(it, band_list, read))
    check_writable(normalize_url(out))
    if model is not None and band_list == list(spec.bands):  # one quick look per item:
        # values like those the model was trained on?
        from relaymap.ingest.ranges import check_item

        for it in items:
            where = f"source item {it.id} of {stac_api}"
            check_item(it, band_list, spec.mean, spec.std, where=where, read=read)
    rows = []
    with tqdm(total=len(items), desc="ingest", unit="scene") as bar:
        for it, url in zip(items, urls, strict=True):
            store = ingest_items(
                [it],
                url,
                band_list,
                label_asset=label_asset,
                class_names=names,
                read=read,
                resolution=resolution,
            )
            rows.append({"id": it.id, "store": store.url, "shape": list(store.shape(0))})
            bar.update(1)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        r["size"] = "x".join(map(str, r["shape"]))
    _table(rows, [("id", "id", ""), ("size", "pixels", ""), ("store", "store", "")])


@main.command()
@click.argument("catalog", default="relaymap-demo/catalog")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def maps(catalog: str, as_json: bool) -> None:
    """List the maps in CATALOG (every collection): id, model, period, class areas.

    \b
    Example:
      relaymap maps relaymap-demo/catalog
    """
    from relaymap.catalog import open_catalog

    require_catalog(catalog)
    rows = []
    for item in open_catalog(catalog).search():
        if "classes" not in item.assets:  # models and other items
            continue
        model = next(
            (
                ln.title.removeprefix("model ")
                for ln in item.links
                if ln.rel == "derived_from" and (ln.title or "").startswith("model ")
            ),
            "-",
        )
        p = item.properties
        period = p.get("relaymap:period") or (
            f"{p['start_datetime'][:10]}/{p['end_datetime'][:10]}"
            if p.get("start_datetime")
            else (item.datetime.date().isoformat() if item.datetime else "-")
        )
        rows.append(
            {
                "id": item.id,
                "model": model,
                "period": period,
                "classes_km2": p.get("relaymap:class_areas_km2", {}),
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo(f"no maps in {catalog}")
        return
    for r in rows:
        r["areas"] = ", ".join(f"{k} {v:.2f}" for k, v in r["classes_km2"].items() if v) or "-"
    _table(
        rows,
        [
            ("id", "map", ""),
            ("model", "model", ""),
            ("period", "period", ""),
            ("areas", "class areas (km2)", ""),
        ],
    )


@main.command()
@click.argument("map_ref", metavar="MAP")
@click.argument("labels", metavar="LABELS")
@click.option("--out", default="evaluation", show_default=True, help="Folder for the PNGs.")
@click.option("--json", "as_json", is_flag=True, help="Print the full scores as JSON.")
def evaluate(map_ref: str, labels: str, out: str, as_json: bool) -> None:
    """Score MAP (a map item .json or a class COG) against LABELS (a labelled scene store
    on the map's grid, or a raster of the map's class values): confusion matrix, per-class
    IoU and F1, overall accuracy; writes OUT/scores.json, OUT/confusion.png, OUT/iou.png.

    \b
    Example:
      relaymap evaluate catalog/relaymap-maps/items/sample-03-run.json scenes/sample-03.zarr
    """
    from pathlib import Path

    from relaymap.flows.products.evaluate import confusion
    from relaymap.flows.products.report import plot_confusion, plot_iou, scores

    cm, names = confusion(map_ref, labels)
    result = scores(cm, names)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scores.json").write_text(json.dumps(result, indent=1))
    plot_confusion(cm, names, folder / "confusion.png")
    plot_iou(result["classes"], folder / "iou.png")
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    rows = [
        {
            "class": n,
            "iou": "-" if c["iou"] is None else f"{c['iou']:.3f}",
            "f1": "-" if c["f1"] is None else f"{c['f1']:.3f}",
            "support": f"{c['support']:,}",
        }
        for n, c in result["classes"].items()
    ]
    _table(
        rows,
        [
            ("class", "class", ""),
            ("iou", "IoU", ""),
            ("f1", "F1", ""),
            ("support", "label pixels", ""),
        ],
    )
    click.echo(
        f"overall accuracy {result['overall_accuracy']:.3f}, mIoU {result['miou']:.3f} "
        f"on {result['pixels']:,} pixels; plots and scores.json in {folder}/"
    )


main.add_command(serve)
main.add_command(change)

if __name__ == "__main__":
    main()

"""``relaymap serve``: a local web map of a catalog's maps (:mod:`relaymap.catalog.webmap`)."""

from __future__ import annotations

import click

#: The catalog ``relaymap demo`` writes.
DEFAULT_CATALOG = "relaymap-demo/catalog"


def require_catalog(catalog: str) -> None:
    """Fail with one line naming the path when there is no static catalog there (a STAC
    API URL is taken as it is)."""
    from relaymap.catalog.storage import exists, join

    if not catalog.startswith(("http://", "https://")) and not exists(
        join(catalog, "catalog.json")
    ):
        raise click.BadParameter(
            f"no STAC catalog at {catalog} (no catalog.json); run `relaymap demo` or give a "
            "catalog folder or URL",
            param_hint="CATALOG",
        )


def _check_catalog(catalog: str) -> None:
    """Fail with one line naming the path when there is no catalog or it has no maps."""
    from relaymap.catalog.webmap import MAP_COLLECTION, MapIndex

    require_catalog(catalog)
    if not MapIndex(catalog).refresh():
        raise click.BadParameter(
            f"the catalog at {catalog} has no maps (collection {MAP_COLLECTION!r} is missing "
            "or empty)",
            param_hint="CATALOG",
        )


@click.command()
@click.argument("catalog", default=DEFAULT_CATALOG)
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="TCP port."
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0: every interface; the map has no login).",
)
@click.option(
    "--basemap",
    default=None,
    help="A base map: an XYZ tile URL ({z}/{x}/{y}) or a MapLibre style URL [default: none, "
    "offline].",
)
@click.option("--attribution", default="", help="The base map's attribution, shown on the map.")
def serve(catalog: str, port: int, host: str, basemap: str | None, attribution: str) -> None:
    """Serve a web map of the maps in CATALOG (a static catalog folder or URL, or a STAC API;
    default: the demo's) until Ctrl-C.

    The page shows one period (the latest) and compares it with a second one side by side
    or by swipe, the earlier on the left; per period the land cover, the imagery it was
    mapped from (true colour), the stable map and the change since the period before, each
    with a toggle and an opacity slider per side, with legends, the class under a click,
    and the class-area and transition tables of the periods shown. Tiles are rendered from
    the rasters registered in the catalog; works offline (MapLibre GL JS is bundled), with
    a base map when --basemap gives one (the page says when it cannot be reached).

    \b
    Example:
      relaymap serve relaymap-demo/catalog --port 8000
      # then open http://127.0.0.1:8000/
      relaymap serve --basemap 'https://tile.openstreetmap.org/{z}/{x}/{y}.png' \\
          --attribution '© OpenStreetMap contributors'
    """
    import uvicorn

    from relaymap.catalog.webmap import Basemap, create_app

    _check_catalog(catalog)
    app = create_app(catalog, basemap=Basemap(basemap, attribution) if basemap else None)
    click.echo(f"relaymap web map of {catalog}: http://{host}:{port}/ (Ctrl-C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


if __name__ == "__main__":  # python -m relaymap.flows.serve (before it is in the main CLI)
    serve()

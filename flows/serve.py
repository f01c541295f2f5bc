"""``relaymap serve``: a local web map of a catalog's maps (:mod:`relaymap.catalog.webmap`)."""

from __future__ import annotations

import click

#: The catalog ``relaymap demo`` writes.
DEFAULT_CATALOG = "relaymap-demo/catalog"


def _check_catalog(catalog: str) -> None:
    """Fail with one line naming the path when there is no catalog or it has no maps."""
    from relaymap.catalog.storage import exists, join
    from relaymap.catalog.webmap import MAP_COLLECTION, MapIndex

    if not catalog.startswith(("http://", "https://")) and not exists(
        join(catalog, "catalog.json")
    ):
        raise click.BadParameter(
            f"no STAC catalog at {catalog} (no catalog.json); run `relaymap demo` or give a "
            "catalog folder or URL",
            param_hint="CATALOG",
        )
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
def serve(catalog: str, port: int, host: str) -> None:
    """Serve a web map of the maps in CATALOG (a static catalog folder or URL, or a STAC API;
    default: the demo's) until Ctrl-C.

    The page lists the maps per model and period, with a layer toggle and an opacity slider
    per map, a period selector, a legend, and the class under a click. Tiles are rendered
    from the class COGs registered in the catalog, with each map's class colours; works
    offline (MapLibre GL JS is bundled).

    \b
    Example:
      relaymap serve relaymap-demo/catalog --port 8000
      # then open http://127.0.0.1:8000/
    """
    import uvicorn

    from relaymap.catalog.webmap import create_app

    _check_catalog(catalog)
    app = create_app(catalog)
    click.echo(f"relaymap web map of {catalog}: http://{host}:{port}/ (Ctrl-C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


if __name__ == "__main__":  # python -m relaymap.flows.serve (before it is in the main CLI)
    serve()

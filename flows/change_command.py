"""``relaymap change``: what changed between two periods of an area run's collection
(:func:`relaymap.flows.products.timeline.change_between`)."""

from __future__ import annotations

import functools
import json

import click

from .products.mmu import MIN_AREA_HA

#: The catalog ``relaymap demo`` writes.
DEFAULT_CATALOG = "relaymap-demo/catalog"


def _area_collection(catalog: str) -> str:
    """The catalog's only area-run collection (one with a class-area table)."""
    from relaymap.catalog import open_catalog

    from .products.change import ChangeError

    cat = open_catalog(catalog)
    areas = [c for c in cat.collection_ids() if "class-areas" in cat.get_collection(c).assets]
    if len(areas) != 1:
        have = ", ".join(areas) or "none"
        raise ChangeError(
            f"give --collection: the catalog at {catalog} has {len(areas)} area-run "
            f"collections ({have})"
        )
    return areas[0]


@click.command()
@click.argument("catalog", default=DEFAULT_CATALOG)
@click.option("--from", "before", required=True, help="The earlier period, e.g. 2024-07.")
@click.option("--to", "after", required=True, help="The later period, e.g. 2024-08.")
@click.option(
    "--collection", default=None, help="The area run's collection [default: the only one]."
)
@click.option(
    "--out", default=None, help="Products go to OUT/changes/ [default: the run's own folder]."
)
@click.option(
    "--min-area-ha",
    type=click.FloatRange(min=0),
    default=MIN_AREA_HA,
    show_default=True,
    help="Minimum mapping unit: connected regions of one from-to pair smaller than this "
    "(hectares) are no change; 0 keeps every pixel.",
)
@click.option("--address", default=None, help="Ray cluster (default: local Ray or RAY_ADDRESS).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def change(
    catalog: str,
    before: str,
    after: str,
    collection: str | None,
    out: str | None,
    min_area_ha: float,
    address: str | None,
    as_json: bool,
) -> None:
    """What changed from period --from to period --to in an area run's collection of
    CATALOG (default: the demo's): the from-to transition matrix in km2 over the pixels
    observable in both (CSV and PNG), a change map (a COG per cell and a VRT mosaic: one
    class per from-to pair that occurred, nodata where either period is unobservable;
    regions of one pair smaller than --min-area-ha, across cell borders, are no change), a
    STAC item linked to both periods' maps, and the same files as assets of the collection.
    Computed per cell on Ray workers. An area run makes these itself for consecutive
    periods.

    \b
    Example:
      relaymap change relaymap-demo/catalog --from 2024-07 --to 2024-08
    """
    from .jobs import run_cell_tasks
    from .products.timeline import change_between
    from .serve import require_catalog

    require_catalog(catalog)
    cid = collection or _area_collection(catalog)
    run = functools.partial(run_cell_tasks, address=address)
    product = change_between(catalog, cid, before, after, run=run, out=out, min_area_ha=min_area_ha)
    if as_json:
        click.echo(json.dumps(product.summary(), indent=1))
        return
    names = list(product.matrix_km2)
    width = max(len(n) for n in [*names, "from \\ to"]) + 2
    col = max(10, *(len(n) + 2 for n in names))
    unit = f"minimum mapping unit {min_area_ha:g} ha" if min_area_ha else "no minimum unit"
    click.echo(f"transitions {before} -> {after} (km2, pixels observable in both, {unit}):")
    click.echo("from \\ to".ljust(width) + "".join(n.rjust(col) for n in names))
    for a in names:
        row = product.matrix_km2[a]
        click.echo(a.ljust(width) + "".join(f"{row[b]:.4f}".rjust(col) for b in names))
    both = product.item.properties["relaymap:observable_km2"]
    click.echo(
        f"changed: {product.changed_km2:.4f} km2 of {both:.4f} km2 observable in both "
        f"({product.cells} cells)"
    )
    click.echo(f"change map: {product.mosaic}")
    click.echo(f"matrix: {product.table} (plot: {product.plot})")
    click.echo(f"item: {product.item.id} ({product.item.get_self_href() or 'registered'})")

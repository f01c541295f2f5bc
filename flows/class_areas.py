"""Class areas over time: per period and class, the mapped area and the area that could
be observed (not cloud or nodata), as a CSV table and a PNG plot."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Any

import pystac

from relaymap.catalog.storage import atomic_upload, atomic_write

COLUMNS = ("period", "class", "area_km2", "observable_km2", "cells")


def class_area_rows(
    periods: Iterable[str], classes: Sequence[str], items: Iterable[pystac.Item]
) -> list[dict[str, Any]]:
    """One row per period and class, summed over the period's cell items (a period without
    items has observable area 0)."""
    totals: dict[str, dict[str, float]] = {p: {} for p in periods}
    cells: dict[str, int] = {}
    for it in items:
        p = it.properties.get("relaymap:period")
        if p is None:
            continue
        t = totals.setdefault(p, {})
        cells[p] = cells.get(p, 0) + 1
        t["_observable"] = t.get("_observable", 0.0) + it.properties["relaymap:observable_km2"]
        for name, km2 in it.properties["relaymap:class_areas_km2"].items():
            t[name] = t.get(name, 0.0) + km2
    return [
        {
            "period": p,
            "class": name,
            "area_km2": round(totals[p].get(name, 0.0), 4),
            "observable_km2": round(totals[p].get("_observable", 0.0), 4),
            "cells": cells.get(p, 0),
        }
        for p in sorted(totals)
        for name in classes
    ]


def write_table(url: str, rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV at ``url`` (atomically); returns ``url``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(url, buf.getvalue().encode())
    return url


def plot_class_areas(
    url: str, rows: Sequence[dict[str, Any]], colors: dict[str, str] | None = None
) -> str:
    """Stacked class areas per period (bars, in ``colors`` by class name when given), with
    the observable area marked; PNG at ``url``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    periods = sorted({r["period"] for r in rows})
    classes = list(dict.fromkeys(r["class"] for r in rows))
    area = {(r["period"], r["class"]): r["area_km2"] for r in rows}
    observable = {r["period"]: r["observable_km2"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(periods) + 2), 3.6), dpi=100)
    x = range(len(periods))
    bottom = [0.0] * len(periods)
    for c in classes:
        values = [area[(p, c)] for p in periods]
        ax.bar(x, values, bottom=bottom, label=c, width=0.7, color=(colors or {}).get(c))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.plot(x, [observable[p] for p in periods], "k_", markersize=40, label="observable")
    ax.set_xticks(list(x), periods, rotation=30 if len(periods) > 6 else 0)
    ax.set_ylabel("km²")
    ax.set_title("class areas per period")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    with atomic_upload(url, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return url

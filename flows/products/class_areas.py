"""Class areas over time: per period and class, the mapped area, the part of it mapped with
low confidence (the highest class probability below a threshold) and the area that could be
observed (not cloud or nodata), as a CSV table and a PNG plot."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Any

import pystac

from relaymap.catalog.storage import atomic_upload, atomic_write

COLUMNS = ("period", "class", "area_km2", "low_confidence_km2", "observable_km2", "cells")


def class_area_rows(
    periods: Iterable[str], classes: Sequence[str], items: Iterable[pystac.Item]
) -> list[dict[str, Any]]:
    """One row per period and class, summed over the period's cell items (a period without
    items has observable area 0). ``low_confidence_km2`` is the part of ``area_km2`` whose
    highest class probability was below the run's threshold (items record it as
    ``relaymap:low_confidence_km2``)."""
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
        for name, km2 in it.properties.get("relaymap:low_confidence_km2", {}).items():
            t[f"_low {name}"] = t.get(f"_low {name}", 0.0) + km2
    return [
        {
            "period": p,
            "class": name,
            "area_km2": round(totals[p].get(name, 0.0), 4),
            "low_confidence_km2": round(totals[p].get(f"_low {name}", 0.0), 4),
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
    """Stacked class areas per period (bars, in ``colors`` by class name when given), the
    low-confidence part of each class hatched, with the observable area marked; PNG at
    ``url``. The legend sits right of the axes, inside the picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    periods = sorted({r["period"] for r in rows})
    classes = list(dict.fromkeys(r["class"] for r in rows))
    area = {(r["period"], r["class"]): r["area_km2"] for r in rows}
    low = {(r["period"], r["class"]): r.get("low_confidence_km2", 0.0) for r in rows}
    observable = {r["period"]: r["observable_km2"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(periods) + 2.6), 3.6), dpi=100)
    x = list(range(len(periods)))
    bottom = [0.0] * len(periods)
    for c in classes:
        values = [area[(p, c)] for p in periods]
        ax.bar(x, values, bottom=bottom, label=c, width=0.7, color=(colors or {}).get(c))
        doubtful = [low[(p, c)] for p in periods]
        if any(doubtful):
            ax.bar(x, doubtful, bottom=bottom, width=0.7, fill=False, hatch="////", lw=0)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.hlines(
        [observable[p] for p in periods],
        [i - 0.42 for i in x],
        [i + 0.42 for i in x],
        colors="k",
        linewidth=2,
        label="observable",
    )
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Patch(facecolor="white", edgecolor="k", hatch="////", lw=0.5))
    labels.append("low confidence")
    ax.set_xticks(x, periods, rotation=30 if len(periods) > 6 else 0)
    ax.set_ylabel("km²")
    ax.set_title("class areas per period")
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    with atomic_upload(url, suffix=".png") as tmp:
        # "tight": the picture grows to hold the legend beside the axes
        fig.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return url

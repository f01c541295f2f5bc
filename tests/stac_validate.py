"""Validate STAC documents against the official JSON schemas, offline.

The schemas are vendored in ``tests/stac_schemas`` (see its README for sources and known
quirks) and resolved through a ``referencing`` registry: nothing is fetched. Every extension
a document declares must be among them, so an undeclared or unknown extension fails.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

SCHEMAS = Path(__file__).with_name("stac_schemas")
CORE = "https://schemas.stacspec.org/v1.1.0"
CORE_SCHEMAS = {
    "Feature": f"{CORE}/item-spec/json-schema/item.json",
    "Collection": f"{CORE}/collection-spec/json-schema/collection.json",
    "Catalog": f"{CORE}/catalog-spec/json-schema/catalog.json",
}


@functools.cache
def registry() -> Registry:
    """Every vendored schema under its ``$id``, its ``$id`` without ``#``, and (extensions)
    its published URL ``https://stac-extensions.github.io/<ext>/<version>/schema.json``."""
    resources = []
    for path in sorted(SCHEMAS.rglob("*.json")):
        doc = json.loads(path.read_text())
        res = Resource.from_contents(doc, default_specification=DRAFT7)
        uris = {doc.get("$id", ""), doc.get("$id", "").rstrip("#")}
        rel = path.relative_to(SCHEMAS).parts
        if rel[0] == "core-v1.1.0":
            spec = {"item": "item-spec", "catalog": "catalog-spec", "collection": "collection-spec"}
            folder = spec.get(path.stem, "item-spec")
            uris.add(f"{CORE}/{folder}/json-schema/{path.name}")  # common.json's $id typo
        elif rel[0] != "geojson":
            uris.add(f"https://stac-extensions.github.io/{rel[0]}/{rel[1]}/schema.json")
        resources += [(uri, res) for uri in uris if uri]
    return Registry().with_resources(resources)


def errors(doc: dict) -> Iterator[str]:
    """What is wrong with one STAC document (core schema and each declared extension)."""
    core = CORE_SCHEMAS.get(doc.get("type", ""))
    if core is None:
        yield f"{doc.get('id')}: unknown type {doc.get('type')!r}"
        return
    for prefix in undeclared(doc):
        yield f"{doc.get('id')}: uses {prefix}:* fields without declaring the extension"
    for url in [core, *doc.get("stac_extensions", [])]:
        try:
            schema = registry().contents(url.rstrip("#"))
        except Exception:
            yield f"{doc.get('id')}: extension schema {url} is not vendored"
            continue
        validator = jsonschema.Draft7Validator(schema, registry=registry())
        for e in validator.iter_errors(doc):
            where = "/".join(map(str, e.absolute_path))
            yield f"{doc.get('id')}: {url.rsplit('/', 3)[-3]}: {where}: {e.message[:300]}"


#: Field prefixes of the extensions we write, and the folder of their vendored schema: a
#: document that uses a prefix must declare that extension (as outside validators check).
PREFIXES = {
    "classification": "classification",
    "eo": "eo",
    "raster": "raster",
    "proj": "projection",
    "file": "file",
    "processing": "processing",
    "mlm": "mlm",
}


def _keys(node) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from _keys(v)
    elif isinstance(node, list):
        for v in node:
            yield from _keys(v)


def undeclared(doc: dict) -> list[str]:
    """Extension prefixes a document uses (in properties, assets, summaries, item assets)
    without declaring the extension."""
    declared = " ".join(doc.get("stac_extensions", []))
    used = {
        k.split(":", 1)[0]
        for part in ("properties", "assets", "summaries", "item_assets")
        for k in _keys(doc.get(part, {}))
        if ":" in k
    }
    if any(":" in k for k in doc if k not in ("stac_extensions",)):
        used |= {k.split(":", 1)[0] for k in doc if ":" in k}
    return sorted(p for p in used if p in PREFIXES and f"/{PREFIXES[p]}/" not in declared)


def validate_tree(root: Path) -> list[str]:
    """Errors of every STAC JSON document (item, collection, catalog) under ``root``."""
    found = []
    for path in sorted(root.rglob("*.json")):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and doc.get("type") in CORE_SCHEMAS and "stac_version" in doc:
            found += [f"{path.relative_to(root)}: {e}" for e in errors(doc)]
    return found

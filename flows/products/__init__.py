"""What relaymap makes from maps, and nothing that schedules it: class and probability COGs
and quicklooks (``cog``), period mosaics (``mosaic``), class areas (``class_areas``), the
imagery under the maps (``imagery``), stable maps (``stable``), the change between periods
(``change``, with its minimum mapping unit: ``mmu``), the products derived over an area
run's periods (``timeline``: which per-cell tasks, their registration), the collection
assets they are published as (``assets``), and scores of maps and models with their plots
(``evaluate``, ``report``).

A product module imports only downward (``relay_models``, ``relaymap.catalog``,
``relaymap.ingest``) and other product modules: it never starts Ray or a flow. The
orchestration in :mod:`relaymap.flows` runs its per-cell functions on workers and passes it
the results; adding a product touches this folder (and the orchestration only to enable it).
"""

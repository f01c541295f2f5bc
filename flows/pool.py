"""A pool of model actors on Ray core: the mapping jobs' workers (``infer``'s
:class:`~relaymap.flows.infer.Predictor`, the area's :class:`~relaymap.flows.cells.CellMapper`).

Why not Ray Data's actor pool (``map_batches(..., compute=ActorPoolStrategy(...))``), which
these jobs used before: Ray Data 2.60 creates every pool actor with two objects of its own
in the object store as constructor arguments, whatever the class takes
(``ActorPoolMapOperator._start_actor``: ``ctx=self._data_context_ref,
map_transformer=self._map_transformer_ref``, both ``ray.put`` in ``MapOperator``), and with
``max_restarts=-1`` unless told otherwise (``_apply_default_remote_args``). Ray core then
prints an ERROR line once per driver, ``core_worker.cc: ... has constructor arguments in
the object store and max_restarts > 0`` (ray-project/ray#53727: a restart needs those
objects, and their lineage is not kept). ``max_restarts=0`` would silence it by giving up
what it warns about: a worker killed mid-cell (out of memory, a lost node) would fail the
job instead of being restarted with its cell run again. Here an actor's constructor
arguments are a few strings, inline in its creation task, so a restarted actor always has
them; restarts and retries stay on (``max_restarts=-1``, ``max_task_retries=-1``).

What the jobs need of a pool is small: ``size`` actors spread over the nodes (one CPU each,
or one GPU), at most ``in_flight`` calls queued per actor (the next batch is ready when
one ends; an area actor runs two cells at once in threads, ``concurrency``), and the
results in order (``infer``'s stitcher) or as they finish (cells).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any


@contextlib.contextmanager
def actor_pool(
    cls: type,
    kwargs: dict[str, Any],
    *,
    size: int,
    use_gpu: bool,
    concurrency: int = 1,
) -> Iterator[list[Any]]:
    """``size`` actors of ``cls(**kwargs)``: one GPU or one CPU each, spread over the
    nodes, restarted when they die (calls in flight are retried), ``concurrency`` calls at
    once in threads; killed on exit, so their CPUs are free for what comes next.
    ``kwargs`` must be small (URLs and options): they travel inline."""
    import ray

    remote = ray.remote(cls).options(
        **({"num_gpus": 1} if use_gpu else {"num_cpus": 1}),
        max_restarts=-1,
        max_task_retries=-1,
        max_concurrency=concurrency,
        scheduling_strategy="SPREAD",
    )
    actors = [remote.remote(**kwargs) for _ in range(size)]
    try:
        yield actors
    finally:
        for actor in actors:
            ray.kill(actor)


def run_ordered(
    actors: list[Any], method: str, payloads: Iterable[Any], *, in_flight: int
) -> Iterator[Any]:
    """``actor.<method>(payload)`` for every payload, at most ``in_flight`` queued per
    actor; results in the order of ``payloads``."""
    import ray

    todo, pending = iter(payloads), deque()

    def submit(actor: Any) -> None:
        for payload in todo:
            pending.append((getattr(actor, method).remote(payload), actor))
            return

    for _ in range(in_flight):
        for actor in actors:
            submit(actor)
    while pending:
        ref, actor = pending.popleft()
        result = ray.get(ref)
        submit(actor)
        yield result


def run_unordered(
    actors: list[Any], method: str, payloads: Iterable[Any], *, in_flight: int
) -> Iterator[Any]:
    """As :func:`run_ordered`, results as they finish; an actor gets the next payload as
    soon as one of its calls ends, so no payload waits behind a busy actor."""
    import ray

    todo, running = iter(payloads), {}

    def submit(actor: Any) -> None:
        for payload in todo:
            running[getattr(actor, method).remote(payload)] = actor
            return

    for _ in range(in_flight):
        for actor in actors:
            submit(actor)
    while running:
        (ref,), _ = ray.wait(list(running), num_returns=1)
        actor = running.pop(ref)
        result = ray.get(ref)
        submit(actor)
        yield result

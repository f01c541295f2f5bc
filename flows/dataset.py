"""Training and validation samples from scene stores, read as the model's data spec says.

The sampler decides *where* (a :class:`~relay_models.geometry.WindowPair`: random centre,
rescale and rotation, or a fixed tile grid); the window reader
(:func:`relay_models.windows.read_pair`) decides *what*, normalised with the run's
:class:`~relay_models.DataSpec`, the same statistics inference uses. No scene is ever read
whole: each window reads the chunks its bounding box touches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from relay_models import ClassSpec, DataSpec
from relay_models.geometry import WindowPair, tile_grid, window_pair
from relay_models.windows import read_pair
from relaymap.ingest import SceneStore, StoreError, open_scene


@dataclass(frozen=True)
class Augment:
    """Random window placement (paper: "Sampling")."""

    #: Probability of rescaling the window side, and the factor range.
    p_rescale: float = 0.5
    rescale: tuple[float, float] = (0.5, 2.0)
    #: Probability of rotating both windows about their centre, and the angle range.
    p_rotate: float = 0.5
    rotate_deg: tuple[float, float] = (-90.0, 90.0)
    #: Skip a sample when more than this fraction of the local window is outside the scene.
    max_outside: float = 0.8


def check_stores(stores: Sequence[SceneStore], *, need_labels: bool) -> tuple[str, ...]:
    """The stores' common band order; ``StoreError`` naming the store that differs."""
    if not stores:
        raise StoreError("no scene store given")
    bands = stores[0].bands
    for s in stores:
        if s.bands != bands:
            raise StoreError(
                f"{s.url} has bands {list(s.bands)} but {stores[0].url} has {list(bands)}; "
                f"every store of a run needs the same bands in the same order"
            )
        if need_labels and not s.has_labels:
            raise StoreError(f"{s.url} has no labels; training needs labelled stores")
    return bands


#: The one class of a pretraining run's data spec: pretraining predicts no classes (its
#: model's head is never used nor exported), but every spec names at least one.
UNLABELLED = (ClassSpec(index=0, value=0, name="unlabelled"),)


def data_spec(
    stores: Sequence[SceneStore],
    *,
    window_px: int,
    factor: int | None,
    classes: Sequence[ClassSpec] | None = None,
) -> DataSpec:
    """The data contract of a model trained on ``stores``: their bands and classes (or
    ``classes``, e.g. :data:`UNLABELLED`), and band statistics pooled over all of them
    (each store weighted by its pixel count), used for training, validation and inference
    alike."""
    check_stores(stores, need_labels=False)
    n = np.array([float(np.prod(s.shape(0))) for s in stores])[:, None]
    mean = np.array([s.attrs.band_mean for s in stores])
    std = np.array([s.attrs.band_std for s in stores])
    pooled = (n * mean).sum(0) / n.sum()
    var = (n * (std**2 + mean**2)).sum(0) / n.sum() - pooled**2
    return DataSpec(
        bands=stores[0].bands,
        mean=tuple(map(float, pooled)),
        std=tuple(map(float, np.sqrt(np.maximum(var, 0.0)))),
        classes=tuple(classes or (ClassSpec(**c) for c in stores[0].attrs.classes)),
        window_px=window_px,
        factor=factor,
        pixel_size=abs(stores[0].geobox(0).resolution.x),
    )


class WindowPairDataset(IterableDataset):
    """Endless random window pairs over scene stores (training).

    Each ``(rank, DataLoader worker)`` draws from its own generator, seeded from ``seed``,
    so workers never repeat each other's samples. Yields dicts with ``local``, ``global``
    (when the spec has a global window) and ``labels``.

    Args:
        urls: scene store URLs (``file://``, ``s3://`` ...).
        spec: the model's data contract (window side, factor, normalisation).
        augment: random rescale/rotation settings.
        seed: base seed.
        rank: this training worker's rank (different ranks draw different samples).
        labels: read labels (training); False: images only, with the global window's
            validity as ``global_valid`` (pretraining, which needs no labels).
    """

    def __init__(
        self,
        urls: Sequence[str],
        spec: DataSpec,
        *,
        augment: Augment = Augment(),
        seed: int = 0,
        rank: int = 0,
        labels: bool = True,
    ) -> None:
        super().__init__()
        self.urls = list(urls)
        self.spec = spec
        self.augment = augment
        self.seed = seed
        self.rank = rank
        self.labels = labels
        check_stores([open_scene(u) for u in self.urls], need_labels=labels)

    def _generator(self) -> np.random.Generator:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return np.random.default_rng([self.seed, self.rank, worker])

    def sample_pair(self, store: SceneStore, rng: np.random.Generator) -> WindowPair:
        """A random window pair in ``store`` (centre uniform over the scene)."""
        h, w = store.shape(0)
        a = self.augment
        side = float(self.spec.window_px)
        if rng.random() < a.p_rescale:
            side *= rng.uniform(*a.rescale)
        angle = float(rng.uniform(*a.rotate_deg)) if rng.random() < a.p_rotate else 0.0
        centre = (float(rng.uniform(0, h)), float(rng.uniform(0, w)))
        return window_pair(centre, side, factor=self.spec.factor or 1, angle_deg=angle)

    def draw(
        self, sources: Sequence[SceneStore], rng: np.random.Generator
    ) -> dict[str, torch.Tensor]:
        """One sample: a store drawn by its pixel count, a window pair in it with no more
        of the local window outside than ``augment.max_outside``, read. ``sources`` are the
        stores, or anything that reads like one (an in-memory pyramid)."""
        sizes = np.array([np.prod(s.shape(0)) for s in sources], dtype=float)
        norm, px = self.spec.norm(), self.spec.window_px
        while True:
            source = sources[rng.choice(len(sources), p=sizes / sizes.sum())]
            pair = self.sample_pair(source, rng)
            if 1 - pair.local.inside_fraction(source.shape(0), px) <= self.augment.max_outside:
                break
        sample = read_pair(
            source,
            pair,
            px,
            norm,
            with_global=self.spec.takes_global,
            labels=self.labels,
            global_valid=not self.labels and self.spec.takes_global,
        )
        if self.labels:
            del sample["valid"]
        return sample

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = self._generator()
        stores = [open_scene(u) for u in self.urls]
        while True:
            yield self.draw(stores, rng)


class IndexedWindowPairs(torch.utils.data.Dataset):
    """Random window pairs by index (pretraining): sample ``i`` is drawn from a generator of
    its own, seeded ``(seed, rank, i)``, so a run resumed at step ``k`` reads exactly the
    samples an uninterrupted run reads from step ``k`` on, whatever the loader workers.

    Args: as :class:`WindowPairDataset`, plus ``length``, the samples of the whole run.
    """

    def __init__(
        self,
        urls: Sequence[str],
        spec: DataSpec,
        *,
        length: int,
        augment: Augment = Augment(),
        seed: int = 0,
        rank: int = 0,
        labels: bool = False,
    ) -> None:
        self.pairs = WindowPairDataset(
            urls, spec, augment=augment, seed=seed, rank=rank, labels=labels
        )
        self.length = length
        self._stores: list[SceneStore] | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._stores is None:
            self._stores = [open_scene(u) for u in self.pairs.urls]
        rng = np.random.default_rng([self.pairs.seed, self.pairs.rank, i])
        return self.pairs.draw(self._stores, rng)


class TileDataset(torch.utils.data.Dataset):
    """Validation: a fixed grid of non-overlapping local tiles (with their global windows)
    over each store, each read once."""

    def __init__(self, urls: Sequence[str], spec: DataSpec) -> None:
        self.spec = spec
        self.tiles: list[tuple[str, WindowPair]] = [
            (url, t.pair(spec.factor or 1))
            for url in urls
            for t in tile_grid(open_scene(url).shape(0), spec.window_px)
        ]
        self._stores: dict[str, SceneStore] = {}

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        url, pair = self.tiles[i]
        store = self._stores.get(url) or self._stores.setdefault(url, open_scene(url))
        sample = read_pair(
            store,
            pair,
            self.spec.window_px,
            self.spec.norm(),
            with_global=self.spec.takes_global,
            labels=True,
        )
        del sample["valid"]
        return sample

"""Window pairs from scene stores, for training and validation.

The sampler decides *where* (a :class:`~relay_models.geometry.WindowPair`: random centre,
rescale and rotation, or a fixed tile grid); :func:`read_pair` decides *what* (the local
window read at the level matching its scale, the global window at its own level, both
resampled to ``L x L`` with :func:`relay_models.sampling.read_window`, normalised with the
store's band statistics, outside-the-scene pixels set to the band mean (0) and ignored).
No scene is ever read whole: each window reads the chunks its bounding box touches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ingest import SceneStore, StoreError, open_scene
from ingest.labels import IGNORE
from relay_models.geometry import Window, WindowPair, tile_grid, window_pair
from relay_models.sampling import read_window


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


def band_norm(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-band ``(C, 1, 1)`` mean and std tensors for z-scoring (std floored at 1e-6)."""
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32).clamp(min=1e-6)[:, None, None]
    return m, s


def read_normalised(
    store: SceneStore,
    win: Window,
    out_px: int,
    norm: tuple[torch.Tensor, torch.Tensor],
    *,
    labels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One window resampled to ``out_px`` from the store level matching its scale.

    Returns:
        ``(C, L, L)`` float32 z-scored bands (0 where there is no data or outside the
        scene), the ``(L, L)`` bool data mask, and ``(L, L)`` int64 labels (255 where
        invalid) when ``labels`` and the store has them, else None.
    """
    level, _ = win.level(out_px, max_level=store.attrs.num_levels)
    image, label, origin = store.read_window(win, level)
    at_level = win.scale(2**level)
    img, _ = read_window(
        torch.from_numpy(image), at_level, out_px, origin_yx=origin, fill=float("nan")
    )
    valid = torch.isfinite(img).all(0)
    mean, std = norm
    img = torch.where(valid, (img - mean) / std, torch.zeros(()))
    lab = None
    if labels and label is not None:
        lab, _ = read_window(
            torch.from_numpy(label)[None],
            at_level,
            out_px,
            origin_yx=origin,
            mode="nearest",
            fill=IGNORE,
        )
        lab = lab[0].long().masked_fill(~valid, IGNORE)
    return img, valid, lab


def read_pair(
    store: SceneStore, pair: WindowPair, out_px: int, *, with_global: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, float]:
    """Read one training/validation window pair, normalised with the store's statistics.

    Returns:
        local ``(C, L, L)`` and global ``(C, L, L)`` (or None) float32 normalised bands
        (0 outside the scene and where there is no data), local labels ``(L, L)`` int64
        (255 outside/no data), and the fraction of the local window inside the scene.
    """
    norm = band_norm(store.attrs.band_mean, store.attrs.band_std)
    local, _, labels = read_normalised(store, pair.local, out_px, norm, labels=True)
    glob = read_normalised(store, pair.global_, out_px, norm)[0] if with_global else None
    inside = pair.local.inside_fraction(store.shape(0), out_px)
    if labels is None:
        labels = torch.full((out_px, out_px), IGNORE, dtype=torch.long)
    return local, glob, labels, inside


class WindowPairDataset(IterableDataset):
    """Endless random window pairs over scene stores (training).

    Each ``(rank, DataLoader worker)`` draws from its own generator, seeded from ``seed``,
    so workers never repeat each other's samples. Yields dicts with ``local``, ``global``
    (when ``factor``), ``labels``.

    Args:
        urls: scene store URLs (``file://``, ``s3://`` ...).
        window_px: local window side L (pixels at level 0, before rescaling).
        factor: global/local side ratio; 0 for models without a global window.
        augment: random rescale/rotation settings.
        seed: base seed.
        rank: this training worker's rank (different ranks draw different samples).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        window_px: int,
        factor: int,
        augment: Augment = Augment(),
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        super().__init__()
        self.urls = list(urls)
        self.window_px = window_px
        self.factor = factor
        self.augment = augment
        self.seed = seed
        self.rank = rank
        self.bands = check_stores([open_scene(u) for u in self.urls], need_labels=True)

    def _generator(self) -> np.random.Generator:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return np.random.default_rng([self.seed, self.rank, worker])

    def sample_pair(self, store: SceneStore, rng: np.random.Generator) -> WindowPair:
        """A random window pair in ``store`` (centre uniform over the scene)."""
        h, w = store.shape(0)
        a = self.augment
        side = float(self.window_px)
        if rng.random() < a.p_rescale:
            side *= rng.uniform(*a.rescale)
        angle = float(rng.uniform(*a.rotate_deg)) if rng.random() < a.p_rotate else 0.0
        centre = (float(rng.uniform(0, h)), float(rng.uniform(0, w)))
        return window_pair(centre, side, factor=max(self.factor, 1), angle_deg=angle)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = self._generator()
        stores = [open_scene(u) for u in self.urls]
        sizes = np.array([np.prod(s.shape(0)) for s in stores], dtype=float)
        while True:
            store = stores[rng.choice(len(stores), p=sizes / sizes.sum())]
            pair = self.sample_pair(store, rng)
            local, glob, labels, inside = read_pair(
                store, pair, self.window_px, with_global=bool(self.factor)
            )
            if 1 - inside > self.augment.max_outside:
                continue
            yield {
                "local": local,
                "labels": labels,
                **({"global": glob} if glob is not None else {}),
            }


def validation_tiles(
    urls: Sequence[str], *, window_px: int, factor: int
) -> list[tuple[str, WindowPair]]:
    """A fixed grid of non-overlapping local tiles (with their global windows) per store."""
    tiles = []
    for url in urls:
        store = open_scene(url)
        for t in tile_grid(store.shape(0), window_px):
            tiles.append((url, t.pair(max(factor, 1))))
    return tiles


class TileDataset(torch.utils.data.Dataset):
    """Validation: the fixed tiles of :func:`validation_tiles`, each read once."""

    def __init__(self, urls: Sequence[str], *, window_px: int, factor: int) -> None:
        self.window_px = window_px
        self.factor = factor
        self.tiles = validation_tiles(urls, window_px=window_px, factor=factor)
        self._stores: dict[str, SceneStore] = {}

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        url, pair = self.tiles[i]
        store = self._stores.get(url) or self._stores.setdefault(url, open_scene(url))
        local, glob, labels, _ = read_pair(
            store, pair, self.window_px, with_global=bool(self.factor)
        )
        return {"local": local, "labels": labels, **({"global": glob} if glob is not None else {})}

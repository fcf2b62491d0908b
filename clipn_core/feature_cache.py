"""Features of a frozen image tower, computed once per image and kept in host memory, up to a bound.

Used by the ``lit`` training stage: its locked image tower is a fixed function of the image
(no augmentation, eval-mode batch norms), so every epoch after the first reuses the features
of the first. The cache belongs to one tower (one per training worker), so an image's key is
its content hash alone. It holds float32 features in CPU memory whatever the tower's device
(a GPU's memory is for training): F x 4 bytes per distinct image (5 KB for EfficientNet-Lite0's
1,280; 100,000 images take 0.5 GB), up to a bound.

When the next image would take it past ``max_bytes`` the cache is full: it keeps what it holds
and caches nothing more, and images it does not hold go through the tower on every epoch. It
does not evict: each epoch visits every image once in a new random order, so a least-recently-used
cache smaller than the data set would evict every image before its next visit and hit almost
never, while keeping the first images seen serves ``capacity / images`` of every epoch from memory.
A cached feature is the exact bits the tower gave; one computed again is the tower's output in that
epoch's batch, the same bits wherever the tower's kernels do not depend on the batch size (on the
CPU, ``test_efficientnet`` gives a batch of 1 other last bits than a batch of 2 or more: ~1e-9).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("clipn.train")


class ImageFeatureCache:
    """``cache(image_ids, pixels, normalize)`` -> the tower's features of those images, computing only uncached ones.

    ``max_bytes``: bound on the host memory the features take (float32, F x 4 bytes per image; the id -> row
    index, about 0.15 KB per image measured, is not counted); ``None`` is unbounded, 0 caches nothing (every image goes
    through the tower on every call). Counters: ``hits`` (rows served from the cache) and ``computed`` (images
    that went through the tower), both since construction. Raises ``ValueError`` for a negative ``max_bytes``.
    """

    ROWS_PER_CHUNK = 1024  # features are stored in [1024, F] blocks: no per-image tensor, no regrowth copies

    def __init__(self, tower: Callable[[torch.Tensor], torch.Tensor], max_bytes: int | None = None):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self.tower, self.max_bytes = tower, max_bytes
        self._row: dict[int, int] = {}  # image id -> its row across the chunks
        self._chunks: list[torch.Tensor] = []  # float32 [<= ROWS_PER_CHUNK, F] on the CPU, all full but the last
        self.full = max_bytes == 0
        self.hits = 0
        self.computed = 0

    def __len__(self) -> int:
        """Distinct images whose features are held."""
        return len(self._row)

    @property
    def bytes(self) -> int:
        """Host memory the feature blocks take (bytes; never above ``max_bytes``)."""
        return sum(c.numel() * c.element_size() for c in self._chunks)

    def _held(self, key: int) -> torch.Tensor:
        row = self._row[key]
        return self._chunks[row // self.ROWS_PER_CHUNK][row % self.ROWS_PER_CHUNK]

    @torch.no_grad()
    def __call__(self, image_ids: torch.Tensor, pixels: torch.Tensor,
                 normalize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Features float32 [N, F], on ``pixels``' device, of ``pixels`` uint8 [N, 3, H, W] whose images have
        content hashes ``image_ids`` int64 [N]. Only the rows whose id is not cached (the first row of an id
        repeated within the batch) go through ``normalize`` (uint8 -> the tower's input) and the tower, in one
        forward; the cached rows come from host memory in one copy, the same bits the tower gave them."""
        ids = image_ids.tolist()
        fresh: dict[int, int] = {}  # id -> its first row in the batch
        for row, key in enumerate(ids):
            if key not in self._row and key not in fresh:
                fresh[key] = row
        computed = None
        if fresh:
            rows = torch.tensor(list(fresh.values()), device=pixels.device)
            computed = self.tower(normalize(pixels[rows])).float()
            self.computed += len(fresh)
        slot = {key: i for i, key in enumerate(fresh)}  # id -> its row of ``computed``
        held = [row for row, key in enumerate(ids) if key not in slot]
        self.hits += len(held)
        if not held:
            out = computed[[slot[key] for key in ids]]
        elif computed is None:
            out = torch.stack([self._held(key) for key in ids]).to(pixels.device)
        else:
            out = torch.empty((len(ids), computed.shape[1]), dtype=computed.dtype, device=pixels.device)
            out[held] = torch.stack([self._held(ids[row]) for row in held]).to(pixels.device)
            new_rows = [row for row, key in enumerate(ids) if key in slot]
            out[new_rows] = computed[[slot[ids[row]] for row in new_rows]]
        if computed is not None and not self.full:
            self._keep(list(fresh), computed)
        return out

    def _keep(self, keys: list[int], computed: torch.Tensor) -> None:
        """Copy the features of as many of ``keys`` (rows of ``computed``) as the bound allows into the host blocks."""
        per_image = computed.shape[1] * computed.element_size()
        capacity = None if self.max_bytes is None else self.max_bytes // per_image
        room = len(keys) if capacity is None else min(len(keys), capacity - len(self._row))
        done = 0
        while done < room:
            n = len(self._row)
            block, offset = divmod(n, self.ROWS_PER_CHUNK)
            if block == len(self._chunks):  # the last block is sized so the blocks never pass the bound
                size = self.ROWS_PER_CHUNK if capacity is None else min(self.ROWS_PER_CHUNK, capacity - n)
                self._chunks.append(torch.empty((size, computed.shape[1]), dtype=computed.dtype))
            chunk = self._chunks[block]
            take = min(room - done, chunk.shape[0] - offset)
            chunk[offset:offset + take] = computed[done:done + take]  # off the GPU when the tower is there
            self._row.update((keys[done + i], n + i) for i in range(take))
            done += take
        if room < len(keys):
            self.full = True
            log.info("image feature cache full: %d images, %.1f MB (bound %.1f MB); images beyond it go through "
                     "the locked image tower every epoch", len(self._row), self.bytes / 1e6, self.max_bytes / 1e6)

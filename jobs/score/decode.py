"""Decode: fetched image bytes -> the rows the scorer takes, one row per input, in CPU tasks.

Every input yields exactly one row: ``uri``, ``byte_size``, ``status`` (``ok`` or an
error kind), ``error`` and either ``pixels`` (uint8 [3, H, W], zeros when status is not
ok; ``runtime.decode: cpu``) or ``data`` (the encoded bytes, empty unless ok;
``runtime.decode: device``, where the scorer decodes and this step does not run). A read
failure stays the ``read_error`` row of the fetch step, a decode failure becomes the
decoder's kind.
"""

from __future__ import annotations

from concurrent.futures import as_completed
from dataclasses import dataclass

import numpy as np

from clipn_core.images import DecodeError, split_preprocessor
from clipn_core.storage import Storage
from jobs import failpoints
from jobs.inputs import tar_members
from jobs.score.read import read_status, start_fetch
from clipn_core.uri_scope import UriScope, uri_text
from schemas.status import STATUS_OK, STATUS_READ_ERROR


@dataclass(frozen=True)
class DecodeSettings:
    """What a decode task needs: the model's preprocess config and how the job decodes (from ``runtime``)."""

    preprocess_cfg: dict
    preprocess: str  # fast | exact
    decode: str  # cpu | device
    max_pixels: int


class _Rows:
    """Columns of one output batch, appended row by row."""

    def __init__(self, settings: DecodeSettings):
        self.ship_bytes = settings.decode == "device"
        self.pre = split_preprocessor(settings.preprocess_cfg, mode=settings.preprocess)
        self.max_pixels = settings.max_pixels
        self.uri: list[str] = []
        self.size: list[int] = []
        self.status: list[str] = []
        self.error: list[str] = []
        self.payload: list = []

    def add(self, uri: str, size: int, status: str, error: str, payload: object = None) -> None:
        self.uri.append(uri)
        self.size.append(size)
        self.status.append(status)
        self.error.append(error)
        self.payload.append(payload)

    def decode(self, data: bytes) -> tuple[str, str, object]:
        """(status, error, payload) of one fetched image: decoded here, or passed on encoded for the scorer."""
        if self.ship_bytes:
            return STATUS_OK, "", data
        out = self.pre.decode(data, self.max_pixels)
        if isinstance(out, DecodeError):
            return out.kind.value, out.message, None
        return STATUS_OK, "", out

    def add_image(self, uri: str, data: bytes) -> None:
        self.add(uri, len(data), *self.decode(data))

    def drop_from(self, start: int) -> None:
        for column in (self.uri, self.size, self.status, self.error, self.payload):
            del column[start:]

    def columns(self) -> dict[str, np.ndarray]:
        out = {
            "uri": np.array(self.uri, dtype=object),
            "byte_size": np.array(self.size, dtype=np.int64),
            "status": np.array(self.status, dtype=object),
            "error": np.array(self.error, dtype=object),
        }
        if self.ship_bytes:
            out["data"] = np.array([p if p is not None else b"" for p in self.payload], dtype=object)
        else:
            blank = np.zeros((3, *self.pre.size), dtype=np.uint8)
            out["pixels"] = (np.stack([p if p is not None else blank for p in self.payload])
                             if self.payload else np.zeros((0, 3, *self.pre.size), np.uint8))
        return out


def read_decode_batch(batch: dict, storage: Storage, settings: DecodeSettings, concurrency: int,
                      scope: UriScope | None = None) -> dict:
    """CPU step for prefix/manifest inputs: fetch every URI's bytes concurrently and decode each as soon as it
    arrives (so a batch waits for its first object only); one row per URI, in input order. A URI ``scope``
    refuses is never fetched: its row is ``invalid_uri``."""
    failpoints.hit("score.decode.batch")
    values = list(batch["uri"])
    uris = [uri_text(u) for u in values]
    futures = start_fetch(values, storage, concurrency, scope)
    slot = {id(f): i for i, f in enumerate(futures)}
    done: list[tuple | None] = [None] * len(uris)
    decoder = _Rows(settings)
    for future in as_completed(futures):
        i = slot[id(future)]
        try:
            data = future.result()
        except Exception as e:  # noqa: BLE001 - recorded in the row, never dropped
            done[i] = (uris[i], -1, read_status(e), f"{type(e).__name__}: {e}", None)
            continue
        done[i] = (uris[i], len(data), *decoder.decode(data))
    for row in done:
        decoder.add(*row)
    return decoder.columns()


def read_tar_batch(batch: dict, storage: Storage, settings: DecodeSettings, extensions: list[str]) -> dict:
    """CPU step for WebDataset shards: one row per image member (``<shard>#<member>``).

    A shard that cannot be read or parsed yields one ``read_error`` row named by the shard.
    """
    exts = tuple(extensions)
    rows = _Rows(settings)
    for shard in batch["uri"]:
        shard = str(shard)
        start = len(rows.uri)
        try:
            for name, data in tar_members(shard, storage):
                if name.lower().endswith(exts):
                    rows.add_image(f"{shard}#{name}", data)
        except Exception as e:  # noqa: BLE001
            rows.drop_from(start)  # a torn shard: record the shard, not a partial member list
            rows.add(shard, -1, STATUS_READ_ERROR, f"unreadable tar shard: {type(e).__name__}: {e}")
    return rows.columns()

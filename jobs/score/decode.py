"""Decode: fetched image bytes -> the rows the scorer takes, one row per input, in CPU tasks.

Every input yields exactly one row: ``uri``, ``byte_size``, ``status`` (``ok`` or an
error kind), ``error`` and either ``pixels`` (uint8 [3, H, W], zeros when status is not
ok; ``runtime.decode: cpu``) or, with ``runtime.decode: device``, ``data`` and ``header``:
a JPEG the device decoder takes (:class:`~clipn_core.device_plan.DevicePlan`) travels
encoded, with its ``header`` (int32 width, height, EXIF orientation); anything else is
decoded here and ``data`` holds its uint8 pixels [3, H, W] as raw bytes (``header`` all
zeros), so the scorer actor never runs a CPU decoder. ``data`` is empty when status is not
ok. A read failure stays the ``read_error`` row of the fetch step, a decode failure becomes
the decoder's kind. Tar shards follow :func:`read_tar_batch`'s rules (a later member with a name
already seen, and members ``skip_scored`` leaves out, get no row and are counted instead).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import as_completed
from dataclasses import dataclass

import numpy as np
import ray

from clipn_core.device_plan import DevicePlan
from clipn_core.images import DecodeError, split_preprocessor
from clipn_core.storage import Storage
from clipn_core.uri_scope import UriScope, uri_text
from jobs import failpoints
from jobs.inputs import tar_entries
from jobs.score.counts import InputCounts
from jobs.score.metrics import RunMetrics
from jobs.score.read import read_status, start_fetch
from schemas.status import LEFT_OUT_DUPLICATE_MEMBER, STATUS_OK, STATUS_READ_ERROR


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
        self.plan = DevicePlan(self.pre, settings.max_pixels)
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
        """(status, error, payload) of one fetched image: decoded here (pixels), or, when the scorer decodes and
        the device decoder takes it, passed on encoded ((bytes, header))."""
        if self.ship_bytes:
            header = self.plan.header(data)
            if header is not None:
                return STATUS_OK, "", (data, header)
        out = self.pre.decode(data, self.max_pixels)
        if isinstance(out, DecodeError):
            return out.kind.value, out.message, None
        return STATUS_OK, "", out

    def add_image(self, uri: str, data: bytes) -> None:
        self.add(uri, len(data), *self.decode(data))

    def columns(self) -> dict[str, np.ndarray]:
        out = {
            "uri": np.array(self.uri, dtype=object),
            "byte_size": np.array(self.size, dtype=np.int64),
            "status": np.array(self.status, dtype=object),
            "error": np.array(self.error, dtype=object),
        }
        if self.ship_bytes:
            data = np.empty(len(self.payload), dtype=object)
            header = np.zeros((len(self.payload), 3), dtype=np.int32)
            for i, p in enumerate(self.payload):
                if isinstance(p, tuple):
                    data[i], header[i] = p
                else:  # pixels travel as raw bytes: a bytes column holds both kinds, no zeros are shipped
                    data[i] = p.tobytes() if p is not None else b""
            out["data"], out["header"] = data, header
        else:
            blank = np.zeros((3, *self.pre.size), dtype=np.uint8)
            out["pixels"] = (np.stack([p if p is not None else blank for p in self.payload])
                             if self.payload else np.zeros((0, 3, *self.pre.size), np.uint8))
        return out


def read_decode_batch(batch: dict, storage: Storage, settings: DecodeSettings, concurrency: int,
                      scope: UriScope | None = None, metrics: RunMetrics | None = None) -> dict:
    """CPU step for prefix/manifest inputs: fetch every URI's bytes concurrently and decode each as soon as it
    arrives (so a batch waits for its first object only); one row per URI, in input order. A URI ``scope``
    refuses is never fetched: its row is ``invalid_uri``. The bytes read are recorded in ``metrics``."""
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
    if metrics is not None:
        metrics.bytes_read(sum(size for size in decoder.size if size > 0))
    return decoder.columns()




def read_tar_batch(batch: dict, storage: Storage, settings: DecodeSettings, extensions: list[str],
                   rows_per_batch: int, counts: InputCounts | None,
                   metrics: RunMetrics | None = None) -> Iterator[dict]:
    """CPU step for WebDataset shards: one row per image member (``<shard>#<member>``), streamed.

    ``batch``: one shard per call in practice: ``uri`` (shard URIs) and optionally ``skip`` (per shard,
    the member names ``skip_scored`` leaves out, or None). Each shard is read member by member
    (:func:`~jobs.inputs.tar_entries`) and rows are yielded in batches of at most ``rows_per_batch``,
    so memory does not grow with the shard. The rules, per shard (members whose name has none of
    ``extensions`` are not inputs):

    * a regular file: decoded, one row;
    * a name without one of ``extensions``: not an input, counted as left out (``extension``);
    * a name seen before in the shard: the first keeps the URI; later ones are not read, not inputs, and
      counted as left out (``duplicate_member``);
    * a name in ``skip``: not read, not decoded, no row, counted as skipped;
    * a symbolic or hard link (or another special member): a ``read_error`` row saying so; links
      are not followed (a stream cannot go back to the target);
    * a shard that cannot be opened, or is torn: the rows of the members read before the fault stay,
      and one ``read_error`` row named by the shard URI stands for the unreadable rest (counted as
      one listed input).

    Each shard's counts (``listed``, ``skipped``, ``left_out:<reason>``) are reported to ``counts`` keyed
    by the shard URI, so a retried task replaces its first report. The image members' bytes read are recorded
    in ``metrics`` per shard.
    """
    exts = tuple(extensions)
    skips = batch.get("skip")
    rows = _Rows(settings)
    for i, shard in enumerate(batch["uri"]):
        shard = str(shard)
        skip = set(skips[i]) if skips is not None and skips[i] is not None else set()
        seen: set[str] = set()
        numbers = {"listed": 0, "skipped": 0, "shards": 1}  # the row check checks every listed shard reported
        read_bytes = 0
        try:
            for entry, read in tar_entries(shard, storage):
                if not entry.name.lower().endswith(exts):
                    numbers["left_out:extension"] = numbers.get("left_out:extension", 0) + 1
                    continue
                if entry.name in seen:
                    key = f"left_out:{LEFT_OUT_DUPLICATE_MEMBER}"
                    numbers[key] = numbers.get(key, 0) + 1
                    continue
                seen.add(entry.name)
                if entry.name in skip:
                    numbers["listed"] += 1
                    numbers["skipped"] += 1
                    continue
                uri = f"{shard}#{entry.name}"
                if entry.kind == "file":
                    data = read()  # a member cut short raises here: it is part of the unreadable rest
                    numbers["listed"] += 1
                    read_bytes += len(data)
                    rows.add_image(uri, data)
                else:
                    numbers["listed"] += 1
                    rows.add(uri, -1, STATUS_READ_ERROR, f"tar member is a {entry.detail}: links and special "
                                                         "members are not followed")
                if len(rows.uri) >= rows_per_batch:
                    yield rows.columns()
                    rows = _Rows(settings)
        except Exception as e:  # noqa: BLE001 - recorded in a row, never dropped
            numbers["listed"] += 1
            rows.add(shard, -1, STATUS_READ_ERROR, f"unreadable tar shard (rows before this point are kept): "
                                                   f"{type(e).__name__}: {e}")
        if metrics is not None:  # once per shard: a shard holds thousands of members
            metrics.bytes_read(read_bytes)
        if counts is not None:
            ray.get(counts.report.remote(f"tar:{shard}", numbers))
    if rows.uri:
        yield rows.columns()

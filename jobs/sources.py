"""Inputs of the scoring job as a Ray dataset, and the CPU read + decode step.

Every input image yields exactly one row from :func:`read_decode_batch` /
:func:`read_tar_batch`: ``uri``, ``byte_size``, ``status`` (``ok`` or an error kind),
``error`` and ``pixels`` (uint8 [3, H, W], zeros when status is not ok). A read
failure becomes a ``read_error`` row, a decode failure the decoder's kind.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import ray

from clipn_core.errors import redact_uri
from clipn_core.images import DecodeError, SplitPreprocessor, load_rgb, split_preprocessor
from clipn_core.storage import filesystem
from jobs.faults import maybe_die
from schemas.output import STATUS_OK, STATUS_READ_ERROR
from schemas.score_config import InputConfig


class InputError(ValueError):
    """The configured input is missing, empty or malformed (raised before any scoring)."""


def _with_protocol(fs, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def checked_parquet(uri: str, field: str, storage_options: dict, arrow_fs,
                    columns: dict[str, tuple[str, tuple]]) -> pads.Dataset:
    """Open the Parquet file or folder at ``uri`` (config field ``field``) through ``arrow_fs`` and check
    ``columns`` ({config field: (column name, accepted Arrow types)}) from the metadata only.

    Raises :class:`InputError` naming the URI and the field at fault (no access, missing
    path, not Parquet, missing column, wrong type).
    """
    fs, path = filesystem(uri, storage_options)
    try:
        found = fs.exists(path)
    except Exception as e:  # noqa: BLE001 - missing bucket, access denied: one clear line
        raise InputError(f"cannot access {field} {redact_uri(uri)}: {type(e).__name__}: {e}") from e
    if not found:
        raise InputError(f"{field} does not exist: {redact_uri(uri)}")
    try:
        ds = pads.dataset(path, filesystem=arrow_fs, format="parquet")
    except Exception as e:  # noqa: BLE001 - not Parquet, unreadable footer, ...
        raise InputError(f"cannot read Parquet at {redact_uri(uri)} ({field}): {type(e).__name__}: {e}") from e
    for field_name, (column, kinds) in columns.items():
        if column not in ds.schema.names:
            raise InputError(f"{redact_uri(uri)} has no column {column!r} ({field_name}); columns: {ds.schema.names}")
        if ds.schema.field(column).type not in kinds:
            raise InputError(f"{redact_uri(uri)}: column {column!r} ({field_name}) is "
                             f"{ds.schema.field(column).type}, expected {kinds[0]}")
    return ds


def list_objects(uri: str, extensions: list[str], storage_options: dict) -> list[str]:
    """Sorted full URIs of objects under ``uri`` whose extension is in ``extensions``."""
    fs, path = filesystem(uri, storage_options)
    try:
        if not fs.exists(path):
            raise InputError(f"input prefix does not exist: {redact_uri(uri)}")
        found = fs.find(path)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - bucket missing, access denied...: one clear line
        raise InputError(f"cannot list {redact_uri(uri)}: {type(e).__name__}: {e}") from e
    exts = tuple(extensions)
    return sorted(_with_protocol(fs, p) for p in found if p.lower().endswith(exts))


def input_dataset(cfg: InputConfig, storage_options: dict, arrow_fs) -> tuple[ray.data.Dataset, int | None]:
    """(dataset with a ``uri`` column, number of inputs when known on the driver).

    prefix: listed on the driver; manifest: read by Ray (streaming, never on the
    driver); tar: one row per shard, expanded to images by :func:`read_tar_batch`.
    """
    if cfg.kind == "manifest":
        fs, path = filesystem(cfg.uri, storage_options)
        if not fs.exists(path):
            raise InputError(f"manifest does not exist: {redact_uri(cfg.uri)}")
        reader = ray.data.read_csv if path.endswith(".csv") else ray.data.read_parquet
        ds = reader(path, filesystem=arrow_fs)
        if cfg.uri_column not in ds.schema().names:
            raise InputError(f"manifest {redact_uri(cfg.uri)} has no column {cfg.uri_column!r} (input.uri_column)")
        ds = ds.select_columns([cfg.uri_column])
        if cfg.uri_column != "uri":
            ds = ds.rename_columns({cfg.uri_column: "uri"})
        return ds, None
    exts = [".tar"] if cfg.kind == "tar" else cfg.extensions
    uris = list_objects(cfg.uri, exts, storage_options)
    if not uris:
        raise InputError(f"no {'/'.join(exts)} objects under {redact_uri(cfg.uri)}")
    blocks = max(1, min(len(uris), 200, len(uris) // 16 or 1))
    ds = ray.data.from_arrow(pa.table({"uri": uris})).repartition(blocks)
    return ds, (len(uris) if cfg.kind == "prefix" else None)


def _row(uri, size, status, error, pixels):
    return {"uri": uri, "byte_size": size, "status": status, "error": error, "pixels": pixels}


def decode_row(uri: str, data: bytes, pre: SplitPreprocessor, max_pixels: int, blank: np.ndarray) -> dict:
    """One image's row: ``status`` ok with uint8 ``pixels`` [3, H, W], or the decode error's status and
    message with ``blank`` pixels (undecodable, too large, or failing the preprocessing)."""
    loaded = load_rgb(data, max_pixels)
    if isinstance(loaded, DecodeError):
        return _row(uri, len(data), loaded.kind.value, loaded.message, blank)
    try:
        pixels = pre.to_uint8(loaded[0])
    except Exception as e:  # noqa: BLE001 - one bad image never kills the batch
        return _row(uri, len(data), "decode_error", f"preprocessing failed: {type(e).__name__}: {e}", blank)
    return _row(uri, len(data), STATUS_OK, "", pixels)


def _stack(rows: list[dict]) -> dict[str, np.ndarray]:
    return {
        "uri": np.array([r["uri"] for r in rows], dtype=object),
        "byte_size": np.array([r["byte_size"] for r in rows], dtype=np.int64),
        "status": np.array([r["status"] for r in rows], dtype=object),
        "error": np.array([r["error"] for r in rows], dtype=object),
        "pixels": np.stack([r["pixels"] for r in rows]) if rows else np.zeros((0, 3, 1, 1), np.uint8),
    }


def read_decode_batch(batch: dict, storage_options: dict, preprocess_cfg: dict, max_pixels: int,
                      fault: str | None = None) -> dict:
    """CPU step for prefix/manifest inputs: fetch each URI's bytes and decode; one row per URI.

    ``fault``: test hook (:mod:`jobs.faults`)."""
    maybe_die(fault, "decode")
    pre = split_preprocessor(preprocess_cfg)
    blank = np.zeros((3, *pre.size), dtype=np.uint8)
    rows = []
    for uri in batch["uri"]:
        uri = str(uri)
        try:
            fs, path = filesystem(uri, storage_options)
            data = fs.cat_file(path)
        except Exception as e:  # noqa: BLE001 - recorded in the row, never dropped
            rows.append(_row(uri, -1, STATUS_READ_ERROR, f"{type(e).__name__}: {e}", blank))
            continue
        rows.append(decode_row(uri, data, pre, max_pixels, blank))
    return _stack(rows)


def tar_members(shard: str, storage_options: dict) -> Iterator[tuple[str, bytes]]:
    """(normalised member name, bytes) of each regular file in a tar shard, in archive order.

    Reading or parsing errors (missing object, torn archive) propagate to the caller,
    possibly after some members were yielded.
    """
    fs, path = filesystem(shard, storage_options)
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path)), mode="r:*") as tar:
        for member in tar:
            if member.isfile():
                yield posixpath.normpath(member.name), tar.extractfile(member).read()


def read_tar_batch(batch: dict, storage_options: dict, preprocess_cfg: dict, max_pixels: int, extensions: list[str]) -> dict:
    """CPU step for WebDataset shards: one row per image member (``<shard>#<member>``).

    A shard that cannot be read or parsed yields one ``read_error`` row named by the shard.
    """
    pre = split_preprocessor(preprocess_cfg)
    blank = np.zeros((3, *pre.size), dtype=np.uint8)
    exts = tuple(extensions)
    rows = []
    for shard in batch["uri"]:
        shard = str(shard)
        start = len(rows)
        try:
            for name, data in tar_members(shard, storage_options):
                if name.lower().endswith(exts):
                    rows.append(decode_row(f"{shard}#{name}", data, pre, max_pixels, blank))
        except Exception as e:  # noqa: BLE001
            del rows[start:]  # a torn shard: record the shard, not a partial member list
            rows.append(_row(shard, -1, STATUS_READ_ERROR, f"unreadable tar shard: {type(e).__name__}: {e}", blank))
    return _stack(rows)

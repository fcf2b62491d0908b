"""Parquet reads through Ray Data with its footer-reader pool sized to the read.

Ray Data 2.60's ``read_parquet`` lists the files' footers on a pool of FooterReader actors,
32 by default, each handed batches of 10 files; the pool is created per read and killed when
the listing ends. Each actor is a worker process to start (an interpreter importing Ray), so
a read of a few files, such as the URIs of the last nights a scoring night skips, started 31
processes that never got a batch. On a 2-CPU Ray, reading four small files took 29-44 s
with the default pool against 8-12 s with one actor (under a CPU hog). Every read here names
its files (or one path, whose files are counted first), so the pool gets one actor per
batch, at most the default. A pool size set in the environment
(``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``) is left as it is: the operator's choice wins.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence

import pyarrow.fs as pafs
import ray

FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FOOTER_BATCH_ENV = "RAY_DATA_PARQUET_FOOTER_BATCH_SIZE"
DEFAULT_FOOTER_ACTORS = 32  # Ray Data's default pool
DEFAULT_FOOTER_BATCH = 10  # Ray Data's files per footer batch

# Ray reads the pool size from the environment twice: once as its module default, when the indexer's module is
# first imported (lazily, by the first Parquet read of the process), and again, with that default as fallback,
# when read_parquet builds a read's indexer (on the calling thread, before it returns). Imported here, before any
# read of ours sets the variable, so the default stays Ray's (or the operator's) for every other read of the
# process. The module path is Ray's internal one: without it (another Ray) the reads still work, unsized.
try:
    import ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer  # noqa: F401
except ImportError:  # pragma: no cover - another Ray release
    pass
# the lock keeps two of our reads from restoring each other's value
_ENV_LOCK = threading.Lock()


def footer_actors(n_files: int) -> int:
    """The footer-reader pool for ``n_files`` files: one actor per footer batch, at least 1, at most the default."""
    batch = int(os.environ.get(FOOTER_BATCH_ENV, DEFAULT_FOOTER_BATCH))
    return max(1, min(DEFAULT_FOOTER_ACTORS, math.ceil(n_files / max(1, batch))))


def count_files(path: str, filesystem: pafs.FileSystem) -> int:
    """1 for a file; the files under a folder (recursively), for a folder."""
    info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        return 1
    found = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    return sum(1 for f in found if f.type == pafs.FileType.File)


def read_parquet(paths: str | Sequence[str], filesystem: pafs.FileSystem, **kwargs) -> ray.data.Dataset:
    """``ray.data.read_parquet(paths, filesystem=filesystem, **kwargs)`` with the footer pool sized to the files
    (module docstring). ``paths``: files, or one file or folder (its files are counted, one listing request).
    Raises what ``ray.data.read_parquet`` raises."""
    files = paths if isinstance(paths, str) else list(paths)
    with _ENV_LOCK:
        # unsized when Ray is not started yet: read_parquet would start it inside the override, and its processes
        # would keep the variable for the session (the jobs start Ray before any read)
        chosen = FOOTER_ACTORS_ENV in os.environ or not ray.is_initialized()
        if not chosen:
            os.environ[FOOTER_ACTORS_ENV] = str(footer_actors(count_files(files, filesystem) if isinstance(files, str)
                                                              else len(files)))
        try:
            return ray.data.read_parquet(files, filesystem=filesystem, **kwargs)
        finally:
            if not chosen:
                del os.environ[FOOTER_ACTORS_ENV]

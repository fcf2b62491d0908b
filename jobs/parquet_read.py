"""Small Parquet reads of the jobs through Ray Data's V1 Parquet reader, which starts no actor.

Ray Data 2.60's default ``read_parquet`` (its DataSourceV2) lists the files' footers on a
pool of FooterReader actors, 32 by default, created for each read and killed when the
listing ends; each actor that gets a worker process before the kill costs an interpreter
importing Ray, while a night's usual reads (the URIs of the few nights it skips, its staged
rows, a manifest file) are a few small files. The V1 reader, still Ray's ``read_parquet``
with ``DataContext.use_datasource_v2 = False`` (the context's documented switch, read when a
dataset is created), plans on the driver instead: it asks the store for each file's size (one
request per file), reads the schema of one, and samples 2-10 files in Ray tasks (pooled
workers). So reads of at most :data:`V1_MAX_FILES` files take V1, larger ones and folders
keep Ray's reader, whose actors spread the footer reads of a long history over the cluster.
``make bench-parquet-read`` (2-CPU VM, a local Ray with 2 CPUs, medians of 5 reads of 4 / 8
small local files, one run): V2 with its 32-actor pool 1.45 / 1.59 s and 2.9 / 3.0 CPU-s of
Ray workers per read (2.6-2.8 worker processes started); V2 with one footer actor 0.88 /
0.85 s, 1.1 CPU-s; the V1 reader 0.18 / 0.16 s, 0.5 / 0.6 CPU-s.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pyarrow.fs as pafs
import ray

# V1 asks for the sizes one file at a time below Ray's FILE_SIZE_FETCH_PARALLELIZATION_THRESHOLD (16 in Ray
# 2.60); from there, on a store that is not a local disk, it lists the files' common folder or starts Ray tasks.
# At 20-100 ms per request to S3, 15 sequential requests cost at most about what the footer pool does.
V1_MAX_FILES = 15

# DataContext.get_current() is one object per process: the lock keeps two of our reads from restoring each
# other's setting (a dataset another thread creates inside the window would be read by V1 too)
_CONTEXT_LOCK = threading.Lock()


def read_parquet(paths: str | Sequence[str], filesystem: pafs.FileSystem, **kwargs) -> ray.data.Dataset:
    """``ray.data.read_parquet(paths, filesystem=filesystem, **kwargs)``, through the V1 reader when ``paths`` is
    one file or at most :data:`V1_MAX_FILES` files (module docstring; the process's DataContext is restored after
    the call), else Ray's own. ``paths``: files, or one file or folder (one request tells which). Raises what
    ``ray.data.read_parquet`` raises."""
    files = paths if isinstance(paths, str) else list(paths)
    small = (filesystem.get_file_info(files).type == pafs.FileType.File if isinstance(files, str)
             else len(files) <= V1_MAX_FILES)
    if not small:
        return ray.data.read_parquet(files, filesystem=filesystem, **kwargs)
    ctx = ray.data.DataContext.get_current()
    with _CONTEXT_LOCK:
        chosen = ctx.use_datasource_v2
        ctx.use_datasource_v2 = False
        try:
            return ray.data.read_parquet(files, filesystem=filesystem, **kwargs)
        finally:
            ctx.use_datasource_v2 = chosen

"""Parquet reads of the jobs through Ray Data's V1 Parquet reader, which starts no actor.

Ray Data 2.60's default ``read_parquet`` (its DataSourceV2) lists the files' footers on a
pool of FooterReader actors, 32 by default, created for each read and killed when the
listing ends; each actor is a worker process to start (an interpreter importing Ray), while
the footers of the files a night reads (the URIs of the nights it skips, its staged rows, a
manifest) are a few kilobytes. The V1 reader, still Ray's ``read_parquet`` with
``DataContext.use_datasource_v2 = False`` (the context's documented switch, read when a
dataset is created), reads them from the driver. ``make bench-parquet-read`` (2-CPU VM, a
local Ray with 2 CPUs, medians of 5 reads of 4 / 8 small files, one run): V2 with its
32-actor pool 1.45 / 1.59 s and 2.9 / 3.0 CPU-s of Ray workers per read (2.6-2.8 worker
processes started); V2 with one footer actor 0.88 / 0.85 s, 1.1 CPU-s; the V1 reader 0.18 /
0.16 s, 0.5 / 0.6 CPU-s.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pyarrow.fs as pafs
import ray

# DataContext.get_current() is one object per process: the lock keeps two of our reads from restoring each
# other's setting
_CONTEXT_LOCK = threading.Lock()


def read_parquet(paths: str | Sequence[str], filesystem: pafs.FileSystem, **kwargs) -> ray.data.Dataset:
    """``ray.data.read_parquet(paths, filesystem=filesystem, **kwargs)`` through the V1 reader (module docstring);
    the process's DataContext is restored after the call, so other reads keep the reader it chose. ``paths``:
    files, or one file or folder. Raises what ``ray.data.read_parquet`` raises."""
    files = paths if isinstance(paths, str) else list(paths)
    ctx = ray.data.DataContext.get_current()
    with _CONTEXT_LOCK:
        chosen = ctx.use_datasource_v2
        ctx.use_datasource_v2 = False
        try:
            return ray.data.read_parquet(files, filesystem=filesystem, **kwargs)
        finally:
            ctx.use_datasource_v2 = chosen

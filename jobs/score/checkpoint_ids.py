"""The committed ids of a resumable run's checkpoint, loaded on the driver with pyarrow.

Ray Data 2.60 loads a checkpoint (``IdColumnCheckpointManager``) with machinery of its own: a Ray task
(``num_cpus=0``) that removes the rows files of pending checkpoints, then a Ray Data ``read_parquet`` of the
checkpoint folder (a file-listing task and read tasks, one CPU each), a repartition to one block and a Ray
task that sorts the ids. On a 2-CPU Ray that took 3.5 s of a resumed run of 30,000 images, most of it
scheduling and starting worker processes, for ten files of one string column (the resume bench's profile,
README "Resume a dead run"). :class:`DriverCheckpointLoader` does the same work on the driver, which waits
for the checkpoint at that point anyway: one listing of each folder and a threaded pyarrow read, in tens of
milliseconds. It plugs in through ``CheckpointConfig(checkpoint_manager_cls=...)``, Ray's public extension
point, and returns what Ray's own manager does: a sorted NumPy array of the ids in the object store and its
size, so that Ray's own ``NumpyArrayBasedCheckpointFilter`` filters the listing with it. The price: the
driver holds the committed ids while it loads them (an Arrow array, then the object ndarray Ray's filter takes)
until they are in the object store; Ray's loader held them in a worker.

Ray's two-phase commit is kept: a write task writes ``<name>.pending.parquet`` before its rows file
``<name>...parquet`` and renames it to ``<name>.parquet`` after; :func:`remove_pending` first deletes every rows
file whose name starts with a pending checkpoint's name (a task killed mid-write), then a committed checkpoint of the
same name (the task had committed once and was running again), then the pending files, and :func:`committed_ids`
loads only the committed ones.
"""

from __future__ import annotations

import logging
import posixpath
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray
from ray.data.checkpoint import CheckpointManager

# Ray's name for a checkpoint whose rows file is not yet known to be written (ray.data.checkpoint.checkpoint_writer)
from ray.data.checkpoint.checkpoint_writer import PENDING_CHECKPOINT_SUFFIX

from clipn_core.errors import StorageError
from clipn_core.storage import with_protocol

log = logging.getLogger("clipn.score")
PENDING = f"{PENDING_CHECKPOINT_SUFFIX}.parquet"
# bytes of a CPython str object beyond its characters (ASCII): Ray sizes its filter actors' memory from this
_STR_OVERHEAD = 49


def _uri(fs: pafs.FileSystem, path: str) -> str:
    """``path`` as the user wrote it (``s3://bucket/key``): the jobs hand Arrow an fsspec filesystem, wrapped."""
    handler = getattr(fs, "handler", None)
    return with_protocol(handler.fs, path) if hasattr(handler, "fs") else path


def _files(fs: pafs.FileSystem, folder: str, recursive: bool) -> list[str]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, recursive=recursive, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"cannot list the checkpoint folder {_uri(fs, folder)}: {e}") from e
    return [f.path for f in infos if f.type == pafs.FileType.File]


def remove_pending(fs: pafs.FileSystem, checkpoint_dir: str, rows_fs: pafs.FileSystem, rows_dir: str) -> int:
    """Undo every unfinished write named by a pending checkpoint ``<name>.pending.parquet`` in ``checkpoint_dir``:
    delete the rows files of ``rows_dir`` (recursively) whose name starts with ``<name>``, then a committed
    ``<name>.parquet`` beside the pending one (a write task that committed, then ran again after a worker died and
    died in turn: its rows file may be half rewritten, so its ids must be scored again), then the pending files.
    Returns how many pending files there were. Paths are the filesystems' own (no scheme). Raises
    :class:`StorageError` naming the folder or file a listing or delete failed on."""
    ckpt_files = _files(fs, checkpoint_dir, recursive=False)
    pending = [p for p in ckpt_files if p.endswith(PENDING)]
    if not pending:
        return 0
    names = tuple(posixpath.basename(p)[: -len(PENDING)] for p in pending)
    doomed = [p for p in _files(rows_fs, rows_dir, recursive=True) if posixpath.basename(p).startswith(names)]
    twins = {posixpath.join(checkpoint_dir, f"{n}.parquet") for n in names} & set(ckpt_files)
    # rows first, then committed twins, then the pending files: a crash in between leaves a pending file, so the
    # next rerun undoes the same write again
    for target_fs, path in [*((rows_fs, p) for p in doomed), *((fs, p) for p in sorted(twins)),
                            *((fs, p) for p in pending)]:
        try:
            target_fs.delete_file(path)
        except OSError as e:
            raise StorageError(f"cannot delete {_uri(target_fs, path)} of a checkpoint's unfinished write: {e}") from e
    log.info("resuming: %d unfinished write(s) of a dead run undone (%d rows files deleted, %d re-run commits)",
             len(pending), len(doomed), len(twins))
    return len(pending)


def committed_ids(fs: pafs.FileSystem, checkpoint_dir: str, id_column: str) -> pa.ChunkedArray | None:
    """The ids named by the committed checkpoint files directly in ``checkpoint_dir`` (``*.parquet`` but not
    ``*.pending.parquet``) as a ``large_string`` array sorted by UTF-8 bytes (which is Python's ``str`` order, the
    order Ray's filter searches); None when there is none. Raises :class:`StorageError` naming the folder when a
    file cannot be read, or when an id is null (a file without ``id_column``)."""
    files = sorted(p for p in _files(fs, checkpoint_dir, recursive=False)
                   if p.endswith(".parquet") and not p.endswith(PENDING))
    if not files:
        return None
    where = _uri(fs, checkpoint_dir)
    try:
        ids = pads.dataset(files, filesystem=fs, format="parquet").to_table(
            columns=[id_column], use_threads=True).column(id_column)
    except (OSError, pa.ArrowException) as e:
        raise StorageError(f"cannot read the {id_column!r} column of the checkpoint in {where}: {e}") from e
    if ids.null_count:
        raise StorageError(f"the checkpoint in {where} has {ids.null_count} null {id_column!r} values (a file "
                           f"without that column?): it cannot say which rows are staged")
    # large_string: a night's ids may pass the 2 GiB a string array's 32-bit offsets can address
    ids = ids.cast(pa.large_string())
    return ids.take(pc.sort_indices(ids)) if len(ids) else None


class DriverCheckpointLoader(CheckpointManager):
    """Ray's checkpoint manager, with the loading done on the driver (module docstring). Ray constructs it with
    ``(checkpoint_config=..., data_context=...)`` when it plans the write."""

    def load_checkpoint(self, data_file_dir: str | None = None,
                        data_file_filesystem: pafs.FileSystem | None = None) -> tuple[ray.ObjectRef | None, int]:
        """Undo unfinished writes (:func:`remove_pending`; only when Ray names the rows folder, as it does for
        every file sink), then ``(ref, bytes)``: the committed ids as a sorted object ndarray in Ray's object
        store and its approximate size in memory (Ray reserves 1.5x of it, at least 1 GiB, per filter actor);
        ``(None, 0)`` when nothing is committed (Ray then adds no filter)."""
        start = time.perf_counter()
        if data_file_dir is not None:
            remove_pending(self.filesystem, self.checkpoint_path_unwrapped, data_file_filesystem or self.filesystem,
                           data_file_dir)
        ids = committed_ids(self.filesystem, self.checkpoint_path_unwrapped, self.id_column)
        if ids is None:
            return None, 0
        chars = int(pc.sum(pc.binary_length(ids)).as_py() or 0)
        array = ids.to_numpy()  # object dtype: what Ray's filter compares the listing's ids with
        del ids
        size = array.nbytes + chars + _STR_OVERHEAD * len(array)
        ref = ray.put(array)
        log.info("resuming: %d committed ids loaded from %s in %.2f s (%.1f MB in memory)", len(array),
                 _uri(self.filesystem, self.checkpoint_path_unwrapped), time.perf_counter() - start, size / 1e6)
        return ref, size

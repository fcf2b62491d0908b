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
``<name>...parquet`` and renames it to ``<name>.parquet`` after; :func:`committed_ids` first deletes every rows
file whose name starts with a pending checkpoint's name (a task killed mid-write), then the pending files, and
loads only the committed ones.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray
from ray.data.checkpoint import CheckpointManager

# Ray's name for a checkpoint whose rows file is not yet known to be written (ray.data.checkpoint.checkpoint_writer)
from ray.data.checkpoint.checkpoint_writer import PENDING_CHECKPOINT_SUFFIX

from clipn_core.errors import StorageError

PENDING = f"{PENDING_CHECKPOINT_SUFFIX}.parquet"
# bytes of a CPython str object beyond its characters (ASCII): Ray sizes its filter actors' memory from this
_STR_OVERHEAD = 49


def _files(fs: pafs.FileSystem, folder: str, recursive: bool) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=recursive, allow_not_found=True))
    return [f.path for f in infos if f.type == pafs.FileType.File]


def remove_pending(fs: pafs.FileSystem, checkpoint_dir: str, rows_fs: pafs.FileSystem, rows_dir: str | None) -> int:
    """Delete the rows files of ``rows_dir`` (recursively) whose name starts with a pending checkpoint's name in
    ``checkpoint_dir``, then those pending checkpoint files; returns how many pending files there were. Paths
    are the filesystems' own (no scheme). Raises :class:`StorageError` naming the file a delete failed on."""
    pending = [p for p in _files(fs, checkpoint_dir, recursive=False) if p.endswith(PENDING)]
    if not pending:
        return 0
    prefixes = tuple(posixpath.basename(p)[: -len(PENDING)] for p in pending)
    doomed = [p for p in _files(rows_fs, rows_dir, recursive=True)
              if posixpath.basename(p).startswith(prefixes)] if rows_dir else []
    for target_fs, path in [*((rows_fs, p) for p in doomed), *((fs, p) for p in pending)]:
        try:  # rows first: a crash in between leaves the pending file, so the next rerun deletes them again
            target_fs.delete_file(path)
        except OSError as e:
            raise StorageError(f"cannot delete {path} of a checkpoint's unfinished write: {e}") from e
    return len(pending)


def committed_ids(fs: pafs.FileSystem, checkpoint_dir: str, id_column: str) -> pa.Array | None:
    """The ids named by the committed checkpoint files directly in ``checkpoint_dir`` (``*.parquet`` but not
    ``*.pending.parquet``), sorted by their UTF-8 bytes (which is Python's ``str`` order); None when there is
    none. Raises :class:`StorageError` naming the folder when a file cannot be read or lacks ``id_column``."""
    files = sorted(p for p in _files(fs, checkpoint_dir, recursive=False)
                   if p.endswith(".parquet") and not p.endswith(PENDING))
    if not files:
        return None
    try:
        table = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=[id_column], use_threads=True)
    except (OSError, pa.ArrowException) as e:
        raise StorageError(f"cannot read the {id_column!r} column of the checkpoint in {checkpoint_dir}: {e}") from e
    ids = table.column(id_column).combine_chunks()
    return ids.take(pc.sort_indices(ids)) if len(ids) else None


class DriverCheckpointLoader(CheckpointManager):
    """Ray's checkpoint manager, with the loading done on the driver (module docstring). Ray constructs it with
    ``(checkpoint_config=..., data_context=...)`` when it plans the write."""

    def load_checkpoint(self, data_file_dir: str | None = None,
                        data_file_filesystem: pafs.FileSystem | None = None) -> tuple[ray.ObjectRef | None, int]:
        """Remove unfinished writes (:func:`remove_pending`), then ``(ref, bytes)``: the committed ids as a sorted
        object ndarray in Ray's object store and its approximate size in memory (Ray reserves 1.5x of it, at
        least 1 GiB, per filter actor); ``(None, 0)`` when nothing is committed (Ray then adds no filter)."""
        remove_pending(self.filesystem, self.checkpoint_path_unwrapped, data_file_filesystem or self.filesystem,
                       data_file_dir)
        ids = committed_ids(self.filesystem, self.checkpoint_path_unwrapped, self.id_column)
        if ids is None:
            return None, 0
        array = ids.to_numpy(zero_copy_only=False)  # object dtype: what Ray's filter compares the listing's ids with
        size = array.nbytes + int(pc.sum(pc.binary_length(ids)).as_py() or 0) + _STR_OVERHEAD * len(array)
        return ray.put(array), size


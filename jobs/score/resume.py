"""Resume: a rerun of a dead run's command keeps what the dead run staged and scores only the rest.

A run that can resume stages under a folder named by :func:`staging_key`, a hash of its command
(the validated config, the run date, the model id and the class set hash; not ``run_id`` nor
``output.take_over_lease``, which name runs), instead of under its random run id. The rerun of
the same command therefore finds the dead run's folder, and a run of any other command never
does (another key, another folder; the sweep removes the dead one's after
``output.staging_max_age_h``).

Inside that folder Ray Data's own checkpointing (``ray.data.checkpoint.CheckpointConfig``, beta in
Ray 2.60) does the work, with ``uri`` as the id column:

* the rows go to ``<staging>/rows/`` and the checkpoint to ``<staging>/_checkpoint/``; publish
  removes the whole folder, checkpoint included (``delete_checkpoint_on_success`` is off: a
  driver that dies between the write and the publish must still leave a checkpoint that names
  its staged rows, or the rerun would score them twice);
* each write task first writes ``_checkpoint/<file>.pending.parquet`` (the ids it is about to
  write), then ``rows/<file>.parquet``, then renames the pending checkpoint to
  ``<file>.parquet`` (two-phase commit);
* when the rerun's write starts, every rows file whose checkpoint is still pending (a task killed
  mid-write) is deleted and the committed ids are loaded, on the driver
  (:mod:`jobs.score.checkpoint_ids`, Ray's ``checkpoint_manager_cls`` hook: Ray's own loader is a Ray
  Data read of its own that cost a resumed run seconds); Ray's filter then drops those URIs right
  after the listing's read tasks, before anything is fetched, decoded or scored;
* the rows files of committed tasks stay in ``rows/`` beside the new ones, and the publish
  moves both in.

Ray applies the filter only when every path of the plan starts at a Ray read (the prefix
listing is one); so a run resumes only with a prefix input, into a Parquet folder, without a
hash join for the skip set. Other runs stage under their run id as before (:func:`resumable`
says why, the README lists what each input kind resumes at).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass

import pyarrow.parquet as pq
from ray.data.checkpoint import CheckpointConfig

from clipn_core.storage import Storage
from jobs.score.checkpoint_ids import DriverCheckpointLoader
from schemas.score_config import ScoreJobConfig

log = logging.getLogger("clipn.score")
ID_COLUMN = "uri"
ROWS = "rows"
CHECKPOINT = "_checkpoint"
# when the first run of the command began its listing: the watermark its night publishes, however often resumed
LISTING = "_listing.json"
KEY_PREFIX = "resume-"
# Ray's checkpoint filter runs in an actor pool that Ray Data gives one CPU per actor (no knob in Ray 2.60)
FILTER_CPUS = 1.0
# options that name runs, not what the run computes: a rerun with them changed is the same command
_NOT_THE_COMMAND = (("run_id",), ("output", "take_over_lease"))


def staging_key(cfg: ScoreJobConfig, run_date: dt.date, model_id: str, class_set_hash: str) -> str:
    """``resume-<24 hex>``: the staging folder name of every run of this command (module docstring). The model id
    and class set hash are in it so that a checkpoint or class file changed in place under the same URI is
    another command."""
    data = cfg.model_dump(mode="json")
    for path in _NOT_THE_COMMAND:
        *parents, leaf = path
        node = data
        for p in parents:
            node = node[p]
        node.pop(leaf, None)
    blob = json.dumps({"config": data, "run_date": run_date.isoformat(), "model_id": model_id,
                       "class_set_hash": class_set_hash}, sort_keys=True, separators=(",", ":"))
    return KEY_PREFIX + hashlib.sha256(blob.encode()).hexdigest()[:24]


def resumable(cfg: ScoreJobConfig, hash_join: bool, add_retries: bool = False,
              cluster_cpus: float | None = None) -> str | None:
    """None when this run can resume a dead run of its command; otherwise why not (logged by the caller).
    ``hash_join``: the skip set is joined, not broadcast; ``add_retries``: ``since`` adds earlier nights'
    transient failures back to the inputs; ``cluster_cpus``: the Ray cluster's CPUs (None: not checked)."""
    if not cfg.output.resume:
        return "output.resume is off"
    if cfg.output.iceberg is not None:
        # a dead run's files may be referenced by a commit whose answer was lost: they are the catalog's to judge
        return "an Iceberg target stages in the table's data folder, where only the catalog knows what is committed"
    if cfg.input.kind != "prefix":
        # tar: output rows are members, read rows are shards, so Ray's id filter never matches; manifest: a line
        # may be null or a duplicate, which Ray's sorted-id filter cannot compare or count
        return f"input.kind {cfg.input.kind} has no resumable id (only prefix inputs resume)"
    if hash_join:
        return ("the skip set is over runtime.skip_broadcast_max_rows: its hash join reads a materialised "
                "dataset, on which Ray does not apply its checkpoint filter")
    if add_retries:
        # the URIs added back come from the skip table in the object store, not from a Ray read: Ray would turn
        # its checkpoint filter off for the whole plan
        return "since: last_run adds transient failures of earlier nights back, which Ray's checkpoint cannot filter"
    rt = cfg.runtime
    needed = FILTER_CPUS + rt.pool_size * rt.cpus_per_actor + rt.decode_cpus
    if cluster_cpus is not None and cluster_cpus < needed:
        # with fewer, the filter actor and the scorer actors hold every CPU and no read task is ever scheduled
        return (f"the cluster has {cluster_cpus:g} CPUs; a resumed run needs {needed:g} (1 for Ray's checkpoint "
                f"filter actor + runtime.pool_size x runtime.cpus_per_actor + runtime.decode_cpus)")
    return None


@dataclass(frozen=True)
class Resume:
    """A resumable run's staging: where Ray writes the rows (``rows_dir``), its :class:`CheckpointConfig`, and the
    rows files that were there before the write (the dead run's)."""

    staged: str
    checkpoint: CheckpointConfig
    before: tuple[str, ...]

    @property
    def rows_dir(self) -> str:
        return f"{self.staged.rstrip('/')}/{ROWS}"

    def first_listing(self, storage: Storage, started_at: dt.datetime) -> dt.datetime:
        """The night's watermark: when the first run of this command began its listing. Recorded in the staging
        folder by that run (before any write); a rerun returns the earlier of the recorded time and its own
        ``started_at``. A row kept from a dead run was read after that run's listing began, so an object changed
        between the two listings is listed again by the next ``since`` night (and a permanent failure's
        ``skip_until`` does not hide its new version)."""
        path = f"{self.staged.rstrip('/')}/{LISTING}"
        if storage.exists(path):
            recorded = dt.datetime.fromisoformat(json.loads(storage.read_bytes(path))["listing_started_at"])
            return min(recorded, started_at)
        storage.write_bytes(path, json.dumps({"listing_started_at": started_at.isoformat()}).encode())
        return started_at

    def resumed_rows(self, storage: Storage) -> int:
        """Rows kept from the dead run once the write is done: those of its rows files that Ray did not delete
        (their checkpoint was committed), counted from the Parquet footers (no data read)."""
        fs, _ = storage.fs(self.staged)
        return sum(pq.ParquetFile(fs.open(p)).metadata.num_rows for p in self.before if fs.exists(p))


def prepare(staged: str, storage: Storage) -> Resume:
    """The checkpoint of the run staging under ``staged``; logs what a dead run left there."""
    fs, path = storage.fs(staged)
    arrow_fs, _ = storage.arrow(staged)
    rows = f"{path.rstrip('/')}/{ROWS}"
    before = tuple(sorted(p for p in fs.find(rows) if p.endswith(".parquet"))) if fs.exists(rows) else ()
    config = CheckpointConfig(ID_COLUMN, f"{path.rstrip('/')}/{CHECKPOINT}", override_filesystem=arrow_fs,
                              delete_checkpoint_on_success=False, checkpoint_manager_cls=DriverCheckpointLoader)
    if before:
        log.info("resuming: %d rows files staged by a dead run of this command are kept where their write "
                 "committed", len(before))
    return Resume(staged, config, before)

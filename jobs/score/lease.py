"""One run per (output, run date): the night lease, and the heartbeat thread that keeps leases and staging alive.

A run takes its night's lease after the setup checks and before it writes anything: one small
object (``<lease root>/run_date=YYYY-MM-DD.json``) naming the run, its host and process, created
only if it does not exist (:func:`jobs.score.store.create`: S3 ``If-None-Match``, a hard link on a
local folder). A second run of the same night finds it and stops with :class:`LeaseHeldError`
(``clipn score`` exits 75, one line naming the live run) before writing anything.

The holder rewrites the object every ``min(60, ttl / 4)`` seconds, only if it is still its own
(S3 ``If-Match``); the object's modification time, on the store's clock, is the heartbeat. A lease
whose heartbeat is older than ``output.lease_ttl_s`` on the store's clock belongs to a dead run:
the next run deletes it only if it is still that version (S3 ``If-Match``; a rename on a local
folder), logs that it did, and takes the night. If two runs break the same dead lease, one
create wins. Where a store offers no conditional writes, a run re-reads its lease at every
heartbeat and once more before it publishes, and stops (:class:`LeaseLostError`) if the object
is no longer its own.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from clipn_core.errors import LeaseHeldError, LeaseLostError, redact_uri
from clipn_core.storage import Storage
from jobs import failpoints
from jobs.score import store

log = logging.getLogger("clipn.score")
HEARTBEAT_EVERY_S = 60.0
_ACQUIRE_ROUNDS = 4  # create, or break a dead lease and create again, a few times before giving up


class Heartbeat:
    """Context manager: calls ``beat`` (at entry too when ``now``) and every ``every_s`` seconds in a thread until
    exit. A failed beat is logged and retried at the next one (``what`` names it in the log)."""

    def __init__(self, beat: Callable[[], None], every_s: float, what: str, now: bool = True):
        self.beat, self.every_s, self.what, self.now = beat, every_s, what, now
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 - a missed beat only ages the heartbeat; the next one retries
                log.warning("could not refresh %s: %s", self.what, e)

    def __enter__(self) -> Heartbeat:
        if self.now:
            self.beat()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {self.what}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def lease_path(root: str, run_date: dt.date) -> str:
    """Where the lease of ``run_date`` lives under a target's lease root."""
    return f"{root.rstrip('/')}/run_date={run_date.isoformat()}.json"


class NightLease:
    """The lease of one night of one output, held by run ``run_id`` (module docstring).

    ``ttl_s``: seconds without heartbeat after which a lease is dead; ``take_over``: the run id of a run
    known to be dead, whose lease is taken at once whatever its heartbeat."""

    def __init__(self, root: str, run_date: dt.date, run_id: str, storage: Storage, ttl_s: float,
                 take_over: str | None = None):
        self.uri, self.run_date, self.run_id, self.storage = lease_path(root, run_date), run_date, run_id, storage
        self.ttl_s, self.take_over = ttl_s, take_over
        self.nonce = uuid.uuid4().hex  # tells our own writes from another process of the same run id
        self.started = dt.datetime.now(dt.timezone.utc)
        self.beats = 0
        self.lost: str | None = None  # why the lease was lost, once it was
        self.broken: list[str] = []  # run ids of dead holders whose leases this run broke
        self._version: store.Version | None = None
        self._heartbeat: Heartbeat | None = None
        self._beat_ok = time.monotonic()  # when the lease was last confirmed ours (acquire, a successful refresh)
        self._made: list[str] = []  # local folders above the lease that did not exist before it, deepest first

    def _record(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": self.started.isoformat(), "nonce": self.nonce, "beat": self.beats}).encode()

    @staticmethod
    def _holder(version: store.Version) -> dict:
        try:
            return json.loads(version.data)
        except ValueError:  # not ours, or cut short by a crash mid-write on a store without atomic writes
            return {"run_id": "<unreadable lease>"}

    def _ours(self, version: store.Version | None) -> bool:
        return version is not None and self._holder(version).get("nonce") == self.nonce

    def acquire(self) -> None:
        """Take the lease, breaking a dead holder's; :class:`LeaseHeldError` naming the live holder otherwise."""
        self._made = _missing_folders(self.storage, self.uri)
        for _ in range(_ACQUIRE_ROUNDS):
            # look before creating: on a store that ignores If-None-Match a create would silently replace a live
            # holder's lease (the holder then finds it lost at its next heartbeat, but this run must not take it)
            current = store.read(self.storage, self.uri)
            created = False
            if current is None:
                created = store.create(self.storage, self.uri, self._record())
                current = store.read(self.storage, self.uri)
            if self._ours(current):  # also when a retried request found our own first write
                self._version = current
                self._beat_ok = time.monotonic()
                return
            if current is None:  # released between our create and our read: try again
                continue
            holder = self._holder(current)
            age = (current.seen_at - current.modified).total_seconds()
            if created:
                # the store ignored the condition (no conditional writes): the last writer holds it
                log.warning("the store holding %s overwrote a lease despite If-None-Match", redact_uri(self.uri))
            if holder.get("run_id") == self.take_over or age >= self.ttl_s:
                why = ("output.take_over_lease names it" if holder.get("run_id") == self.take_over
                       else f"its last heartbeat was {age:.0f} s ago, output.lease_ttl_s is {self.ttl_s:g} s")
                if store.delete(self.storage, self.uri, current):
                    log.warning("broke the lease of run %s on night %s (%s): %s", holder.get("run_id"),
                                self.run_date, why, redact_uri(self.uri))
                    self.broken.append(str(holder.get("run_id")))
                continue  # deleted, or someone else changed it meanwhile: look again
            raise LeaseHeldError(
                f"night {self.run_date} is being scored by run {holder.get('run_id')} (host {holder.get('host')}, "
                f"pid {holder.get('pid')}, started {holder.get('started')}, last heartbeat {age:.0f} s ago); this "
                f"run wrote nothing. Lease {redact_uri(self.uri)}: it is dead after {self.ttl_s:g} s without "
                "heartbeat (output.lease_ttl_s), or at once with output.take_over_lease")
        raise LeaseHeldError(f"night {self.run_date}: could not take the lease {redact_uri(self.uri)} in "
                             f"{_ACQUIRE_ROUNDS} rounds: other runs keep changing it; this run wrote nothing")

    def refresh(self) -> None:
        """One heartbeat: rewrite the lease if it is still ours; marks it lost (see :meth:`check`) otherwise."""
        if self.lost or self._version is None:
            return
        self.beats += 1
        # read before writing: a store that ignores If-Match would let this write replace another run's lease
        current = store.read(self.storage, self.uri)
        if self._ours(current):
            store.replace(self.storage, self.uri, self._record(), current)
        # read back whatever the conditional write said: a retried request may have found our own first write
        current = store.read(self.storage, self.uri)
        if self._ours(current):
            self._version = current
            self._beat_ok = time.monotonic()
            return
        holder = self._holder(current)["run_id"] if current else "nobody"
        self.lost = f"the lease {redact_uri(self.uri)} of night {self.run_date} is now held by {holder}"
        log.error("run %s lost its lease: %s", self.run_id, self.lost)

    def check(self) -> None:
        """Re-read the lease: :class:`LeaseLostError` unless this run still holds it and its last successful
        heartbeat is younger than half the TTL (called before publishing: a run whose heartbeats have been failing
        may be declared dead by another run while it publishes)."""
        silent = time.monotonic() - self._beat_ok
        if self.lost is None and silent > self.ttl_s / 2:
            self.lost = (f"its last successful heartbeat of the lease {redact_uri(self.uri)} was {silent:.0f} s ago, "
                         f"over half of output.lease_ttl_s")
        if self.lost is None and not self._ours(store.read(self.storage, self.uri)):
            self.lost = f"the lease {redact_uri(self.uri)} of night {self.run_date} is no longer this run's"
        if self.lost:
            raise LeaseLostError(f"run {self.run_id} does not publish: {self.lost} (its heartbeat stopped for "
                                 f"longer than output.lease_ttl_s = {self.ttl_s:g} s, or another run took it over)")

    def release(self) -> None:
        """Delete the lease if it is still ours (nothing otherwise)."""
        if self._version is not None and not self.lost:
            if not store.delete(self.storage, self.uri, self._version):
                log.warning("the lease %s was no longer run %s's at release", redact_uri(self.uri), self.run_id)
        fs, path = self.storage.fs(self.uri)
        remove_empty_folder(fs, path.rsplit("/", 1)[0])
        for folder in self._made:  # the output folders this run's lease created, if nothing else filled them
            remove_empty_folder(fs, folder)

    def __enter__(self) -> NightLease:
        self.acquire()
        self._heartbeat = Heartbeat(self.refresh, min(HEARTBEAT_EVERY_S, self.ttl_s / 4), f"lease {redact_uri(self.uri)}",
                                    now=False)
        self._heartbeat.__enter__()
        try:
            failpoints.hit("lease.acquired")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._heartbeat.__exit__(*exc)
        finally:
            self.release()


def _missing_folders(storage: Storage, uri: str) -> list[str]:
    """The local folders above ``uri``'s folder that do not exist yet, deepest first (none on object stores)."""
    fs, path = storage.fs(uri)
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    if protocol not in ("file", "local"):
        return []
    missing = []
    folder = os.path.dirname(os.path.dirname(path))
    while folder and not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def remove_empty_folder(fs, path: str) -> None:
    """Remove ``path`` if it is an empty local folder (object stores have no empty folders to leave behind)."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    if protocol in ("file", "local"):
        try:
            os.rmdir(path)
        except OSError:  # not empty (another run's files), or already gone
            pass

"""The night lease: one run per output and night, on a local folder, on the loopback S3 server (conditional
writes) and on a store without conditional writes; dead leases are broken, live ones never."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
import uuid

import pytest

from clipn_core.errors import LeaseHeldError, LeaseLostError
from clipn_core.storage import Storage
from jobs.score import store
from jobs.score.lease import NightLease, lease_path

DAY = dt.date(2026, 11, 24)
TTL_S = 900.0


# the S3 case starts the session's loopback server: slow (make test-fast leaves it out)
S3 = pytest.param("s3", marks=pytest.mark.slow)


@pytest.fixture(params=["local", S3, "memory"])
def where(request, tmp_path):
    """(lease root, storage) on each kind of store: a local folder, S3 (conditional requests), and fsspec's
    in-memory store, which offers none of the conditional operations we use there (the generic path)."""
    if request.param == "local":
        return str(tmp_path / "out" / "_leases"), Storage({})
    if request.param == "memory":
        return f"memory://lease-{uuid.uuid4().hex}/_leases", Storage({})
    bucket, opts = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out/_leases", Storage(opts)


def _lease(where, run_id: str, **kw) -> NightLease:
    root, storage = where
    return NightLease(root, DAY, run_id, storage, kw.pop("ttl_s", TTL_S), **kw)


def _age(where, seconds: float) -> None:
    """Make the lease object look ``seconds`` old to the store (local: its modification time; elsewhere the
    test waits, as a store's clock cannot be set back)."""
    root, storage = where
    path = lease_path(root, DAY)
    if root.startswith("s3://") or root.startswith("memory://"):
        time.sleep(seconds)
    else:
        then = time.time() - seconds
        os.utime(path, (then, then))


def _holder(where) -> str | None:
    root, storage = where
    found = store.read(storage, lease_path(root, DAY))
    return json.loads(found.data)["run_id"] if found else None


def _take(lease: NightLease, name: str, start: threading.Barrier, results: dict) -> None:
    start.wait()
    try:
        lease.acquire()
        results[name] = "held"
    except LeaseHeldError as e:
        results[name] = str(e)


@pytest.mark.parametrize("where", ["local", S3], indirect=True)
def test_two_runs_taking_the_same_night_at_once_one_wins_and_the_other_is_told_who(where):
    for round_ in range(5):
        a, b = _lease(where, f"a{round_}"), _lease(where, f"b{round_}")
        start, results = threading.Barrier(2), {}
        threads = [threading.Thread(target=_take, args=(lease, name, start, results))
                   for lease, name in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        winners = [n for n, r in results.items() if r == "held"]
        assert len(winners) == 1, results
        loser = ({"a", "b"} - set(winners)).pop()
        assert f"run {winners[0]}{round_} " in results[loser]  # the refusal names the live run
        assert _holder(where) == f"{winners[0]}{round_}"
        (a if winners == ["a"] else b).release()
        assert _holder(where) is None


def test_a_live_lease_refuses_a_dead_one_is_broken_with_a_log_line(where, caplog):
    a = _lease(where, "first")
    a.acquire()
    a.refresh()  # a heartbeat rewrites it; it stays the holder's
    assert _holder(where) == "first" and a.lost is None
    with pytest.raises(LeaseHeldError, match=r"run first .*last heartbeat \d+ s ago"):
        _lease(where, "second").acquire()
    _age(where, 3.0 if not where[0].startswith(("s3", "memory")) else 2.5)
    b = _lease(where, "second", ttl_s=1.0)
    with caplog.at_level(logging.WARNING, logger="clipn.score"):
        b.acquire()
    assert _holder(where) == "second" and b.broken == ["first"]
    assert any("broke the lease of run first" in r.getMessage() for r in caplog.records)
    b.ttl_s = TTL_S  # the 1 s TTL only served to find the first run dead; b's own lease lives by the usual one
    # the first run, alive after all: its next heartbeat finds the lease taken, and it must not publish
    a.refresh()
    with pytest.raises(LeaseLostError, match="second"):
        a.check()
    a.release()  # never deletes the new holder's lease
    assert _holder(where) == "second"
    b.check()
    b.release()
    assert _holder(where) is None


def test_take_over_names_a_dead_run_whose_lease_is_taken_at_once(where):
    _lease(where, "crashed").acquire()
    with pytest.raises(LeaseHeldError):
        _lease(where, "rerun", take_over="someone-else").acquire()
    rerun = _lease(where, "rerun", take_over="crashed")
    rerun.acquire()
    assert _holder(where) == "rerun" and rerun.broken == ["crashed"]


def test_a_lease_overwritten_behind_its_back_is_lost_at_the_next_heartbeat(where):
    """What protects a store that ignores conditional writes: the holder re-reads its lease at every heartbeat
    and before publishing."""
    root, storage = where
    a = _lease(where, "first")
    a.acquire()
    fs, path = storage.fs(lease_path(root, DAY))
    fs.pipe_file(path, json.dumps({"run_id": "intruder", "nonce": "x"}).encode())  # an unconditional write
    a.refresh()
    assert a.lost and "intruder" in a.lost
    with pytest.raises(LeaseLostError):
        a.check()


def test_the_lease_as_a_context_manager_beats_and_releases(where):
    root, storage = where
    with NightLease(root, DAY, "ctx", storage, ttl_s=0.2) as lease:  # beats every 0.05 s
        deadline = time.monotonic() + 30
        while lease.beats < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.beats >= 2 and lease.lost is None and _holder(where) == "ctx"
    assert _holder(where) is None
    if root.startswith("/"):
        assert not os.path.exists(root)  # no empty _leases folder left behind


def test_a_store_that_ignores_conditional_writes_never_hands_a_live_lease_to_a_second_run(where, monkeypatch):
    """An S3-compatible store that ignores If-None-Match / If-Match: the second run reads before it creates and is
    refused, and a heartbeat never rewrites a lease that is no longer its own."""
    if where[0].startswith("s3://"):
        call = store._s3

        def unconditional(fs, method, **kwargs):
            kwargs.pop("IfNoneMatch", None)
            kwargs.pop("IfMatch", None)
            return call(fs, method, **kwargs)

        monkeypatch.setattr(store, "_s3", unconditional)
    a = _lease(where, "first")
    a.acquire()
    with pytest.raises(LeaseHeldError, match="run first"):
        _lease(where, "second").acquire()
    assert _holder(where) == "first"
    root, storage = where
    fs, path = storage.fs(lease_path(root, DAY))
    fs.pipe_file(path, json.dumps({"run_id": "intruder", "nonce": "x"}).encode())
    a.refresh()
    assert a.lost and _holder(where) == "intruder"  # lost, and the intruder's lease left as it is


def test_a_run_whose_heartbeats_have_been_failing_does_not_publish(where):
    """Another run may break a lease whose heartbeat is older than the TTL, even while its holder publishes: the
    holder refuses to publish once its last successful heartbeat is older than half the TTL."""
    a = _lease(where, "first", ttl_s=0.4)
    a.acquire()
    time.sleep(0.3)
    with pytest.raises(LeaseLostError, match="last successful heartbeat"):
        a.check()
    assert _holder(where) == "first"  # nobody took it; this run only stops before publishing

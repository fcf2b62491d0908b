"""Prefix listing in Ray tasks: exactly the objects the driver-side listing finds, split into disjoint key ranges."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time

import fsspec
import pytest

from clipn_core.errors import InputError
from clipn_core.storage import Storage
from jobs.inputs import list_objects
from jobs.score.listing import (
    Folder,
    KeyRange,
    LeftOut,
    ObjectListing,
    start_after,
    successor,
    walk_generic,
    walk_local,
)

EXTS = [".jpg", ".png"]
KEYS = ([f"img_{i:04d}.jpg" for i in range(150)] + [f"d{j}/sub/x{i}.png" for j in range(3) for i in range(25)]
        + ["~tilde.jpg", "ünï.jpg", " space.jpg", "#hash.jpg", "?q.jpg", "*star.jpg", "[b].jpg", "Z.PNG",
           "notes.txt", "a\U0010ffffb.jpg", "\x01ctrl.jpg", ".jpg"])


def test_range_bounds_order_like_s3_keys():
    """successor() bounds a whole prefix; start_after() sits just below a lower bound (S3's StartAfter)."""
    assert successor("a") == "b" and successor("") is None and successor("a\U0010ffff") == "b"
    assert successor("p/\ud7ff") == "p/\ue000"  # surrogates are not UTF-8: skipped
    for lower in ("p/b", "p/0", "p/\x01", "p/\ue000"):
        below = start_after(lower)
        assert below < lower and all(below < key for key in (lower, lower + "x", lower + "\x00"))
    rng = KeyRange("p/", "p/", successor("p/"))
    assert rng.holds("p/") and rng.holds("p/\U0010ffff") and not rng.holds("p0") and not rng.holds("p.")


@pytest.mark.slow
def test_a_flat_folder_is_planned_with_few_requests(s3_bucket, ray_local):
    """The skip-scan asks only for characters that occur: a flat folder of numbered keys splits along its
    digits in a few dozen requests, and the ranges hold every key exactly once."""
    from tests.fault_proxy import FaultProxy

    bucket, opts = s3_bucket
    fs = fsspec.filesystem("s3", **opts)
    keys = [f"flat/img_{i:05d}.jpg" for i in range(300)] + ["flat/~odd.jpg", "flat/ü.jpg"]
    for key in keys:
        fs.pipe_file(f"{bucket}/{key}", b"")
    proxy = FaultProxy(opts["client_kwargs"]["endpoint_url"], rate=0.0)
    endpoint = proxy.start()
    try:
        storage = Storage({**opts, "client_kwargs": {**opts["client_kwargs"], "endpoint_url": endpoint}})
        listing = ObjectListing(f"s3://{bucket}/flat/", EXTS, storage, target_ranges=16, page_size=10)
        planning = proxy.requests
    finally:
        proxy.stop()
    assert len(listing.ranges) >= 16 and planning < 60, (len(listing.ranges), planning)
    for key in keys:
        assert sum(r.holds(key) for r in listing.ranges) == 1, key


@pytest.mark.slow
@pytest.mark.parametrize("page_size", [1000, 7])
def test_s3_listing_in_tasks_equals_the_driver_listing(s3_bucket, ray_local, page_size):
    bucket, opts = s3_bucket
    fs = fsspec.filesystem("s3", **opts)
    for key in KEYS:
        fs.pipe_file(f"{bucket}/lake/{key}", b"")
    fs.pipe_file(f"{bucket}/lakeside/not-under-the-prefix.jpg", b"")
    storage = Storage(opts)
    want = list_objects(f"s3://{bucket}/lake/", EXTS, storage)
    listing = ObjectListing(f"s3://{bucket}/lake/", EXTS, storage, target_ranges=16, page_size=page_size)
    got = sorted(r["uri"] for r in ray_local.data.read_datasource(listing).take_all())
    assert got == want and len(got) == len(KEYS) - 1  # notes.txt has another extension
    assert listing.totals() == (len(want), 0)
    if page_size < 100:  # more than a page: listed as many disjoint ranges in parallel
        assert len(listing.ranges) >= 16


@pytest.mark.slow
def test_local_listing_by_folder_and_the_since_watermark(tmp_path, ray_local):
    root = tmp_path / "lake"
    for key in KEYS:
        if "\U0010ffff" in key or "\x01" in key:
            continue  # not representable in every local filesystem
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    storage = Storage({})
    want = list_objects(str(root), EXTS, storage)
    listing = ObjectListing(str(root), EXTS, storage)
    assert sorted(r["uri"] for r in ray_local.data.read_datasource(listing).take_all()) == want
    # only what changed after the watermark
    time.sleep(0.05)
    cut = dt.datetime.now(dt.timezone.utc)
    time.sleep(0.05)
    (root / "img_0003.jpg").write_bytes(b"x")
    (root / "d1" / "sub" / "new.png").write_bytes(b"")
    listing = ObjectListing(str(root), EXTS, storage, since=cut)
    assert sorted(r["uri"] for r in ray_local.data.read_datasource(listing).take_all()) == sorted(
        [str(root / "img_0003.jpg"), str(root / "d1" / "sub" / "new.png")])
    assert listing.totals() == (2, len(want) - 1)
    # the run's later stages share the listing's counts actor: their reports and the listing's stay apart
    from jobs.score.counts import LEFT_OUT, LISTED, totals

    left_out = listing.left_out()
    ray_local.get(listing.counts.report.remote("tar:s3://b/0.tar", {LISTED: 7, LEFT_OUT + "extension": 1}))
    assert listing.totals() == (2, len(want) - 1) and listing.left_out() == left_out
    assert totals(listing.counts) == ({LISTED: 7}, {"extension": 1})


@pytest.mark.slow
def test_missing_and_empty_prefixes_fail_while_planning(s3_bucket, tmp_path, ray_local):
    bucket, opts = s3_bucket
    with pytest.raises(InputError, match="nothing-here"):
        ObjectListing(f"s3://{bucket}/nothing-here/", EXTS, Storage(opts))
    with pytest.raises(InputError, match="no-such-bucket"):
        ObjectListing("s3://no-such-bucket-for-clipn/x/", EXTS, Storage(opts))
    with pytest.raises(InputError, match="does not exist"):
        ObjectListing(str(tmp_path / "nope"), EXTS, Storage({}))


# ------------------------------------------------------------------ entries the listing cannot use

def _dangling(root):
    (root / "gone.jpg").symlink_to(root / "nowhere" / "gone.jpg")
    return {"gone.jpg"}, {}


def _loop(root):
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    return {"loop.jpg"}, {}


def _vanished_files(root):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (root / name).write_bytes(b"x")
    return {"a.jpg", "b.jpg", "c.jpg"}, {}


def _vanished_folder(root):
    for sub in ("a", "b"):
        (root / sub).mkdir()
        (root / sub / f"{sub}.jpg").write_bytes(b"x")
    return set(), {"unreadable_folder": 2}  # ok.jpg is listed first (the top folder's files come first)


def _unencodable_file(root):
    open(os.path.join(os.fsencode(root), b"caf\xe9.jpg"), "wb").close()  # Latin-1, not UTF-8
    return set(), {"unencodable_name": 1}


def _unencodable_folder(root):
    sub = os.path.join(os.fsencode(root), b"d\xff")
    os.mkdir(sub)
    open(os.path.join(sub, b"x.jpg"), "wb").close()
    return set(), {"unencodable_name": 1}


def _locked_folder(root):
    (root / "locked").mkdir()
    (root / "locked" / "x.jpg").write_bytes(b"x")
    (root / "locked").chmod(0)
    return set(), {"unreadable_folder": 1}


def _locked_file(root):
    (root / "secret.jpg").write_bytes(b"x")
    (root / "secret.jpg").chmod(0)
    return {"secret.jpg"}, {}  # listed: its fetch fails, so its row is read_error


def _fifo(root):
    os.mkfifo(root / "pipe.jpg")
    return set(), {"not_a_file": 1}


def _link_to_folder(root):
    (root / "dir").mkdir()
    (root / "dir.jpg").symlink_to(root / "dir")
    return set(), {"not_a_file": 1}


def _other_extension(root):
    (root / "notes.txt").write_bytes(b"x")
    (root / "README").write_bytes(b"x")
    return set(), {"extension": 2}


ENTRY_KINDS = {
    "dangling_link": _dangling, "link_loop": _loop, "vanished_file": _vanished_files,
    "vanished_folder": _vanished_folder, "unencodable_file": _unencodable_file,
    "unencodable_folder": _unencodable_folder, "permission_denied_folder": _locked_folder,
    "permission_denied_file": _locked_file, "fifo": _fifo, "link_to_folder": _link_to_folder,
    "other_extension": _other_extension,
}
_WALK = """
import json, sys
from jobs.score.listing import Folder, LeftOut, walk_local
left_out = LeftOut()
listed = [o.key for o in walk_local(Folder(sys.argv[1], recursive=True), (".jpg",), left_out)]
print(json.dumps({"listed": listed, "left_out": dict(left_out.counts)}))
"""


def _walk_without_privileges(root) -> tuple[list[str], dict]:
    """The walk in a process that permissions apply to: as root, one without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH (setpriv drops them from the bounding set), so a mode-000 entry is unreadable."""
    cmd = [sys.executable, "-c", _WALK, str(root)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: root reads mode-000 entries, no permission error to list")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return out["listed"], out["left_out"]


@pytest.mark.parametrize("kind", list(ENTRY_KINDS))
def test_no_entry_stops_a_local_listing(tmp_path, kind):
    """Every entry the listing cannot use gets its row (listed; the fetch records read_error) or is left out and
    counted by reason; the good image is always listed and nothing is raised."""
    root = tmp_path / "lake"
    root.mkdir()
    (root / "ok.jpg").write_bytes(b"x")
    want, want_left_out = ENTRY_KINDS[kind](root)
    if kind.startswith("permission_denied"):
        try:
            listed, left_out = _walk_without_privileges(root)
        finally:
            for path in root.iterdir():
                path.chmod(0o755)
    else:
        left = LeftOut()
        walk = walk_local(Folder(str(root), recursive=True), (".jpg",), left)
        listed = [next(walk).key]
        if kind.startswith("vanished"):  # entries and folders removed while the listing runs
            for path in root.iterdir():
                if str(path) != listed[0]:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        listed += [o.key for o in walk]
        left_out = dict(left.counts)
    names = {os.path.relpath(k, root) for k in listed}
    assert len(names) == len(listed) and names == want | {"ok.jpg"}
    assert {k: v for k, v in left_out.items() if v} == want_left_out


def test_vanished_files_are_listed_with_unknown_times(tmp_path):
    """A file gone between the folder's listing and its stat keeps its row (the fetch says it is gone)."""
    root = tmp_path / "lake"
    root.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (root / name).write_bytes(b"x")
    walk = walk_local(Folder(str(root), recursive=False), (".jpg",), LeftOut())
    first = next(walk)
    for path in root.iterdir():
        if str(path) != first.key:
            path.unlink()
    rest = list(walk)
    assert first.modified is not None and len(rest) == 2
    assert all(o.modified is None and o.size == 0 for o in rest)


def test_a_generic_store_counts_folders_it_cannot_list(tmp_path):
    """fsspec's walk skips a folder it cannot list unless asked: the generic listing counts it."""
    from fsspec.implementations.memory import MemoryFileSystem

    class Locked(MemoryFileSystem):
        def ls(self, path, detail=True, **kwargs):
            if path.rstrip("/").endswith("locked"):
                raise PermissionError(13, "Permission denied", path)
            return super().ls(path, detail=detail, **kwargs)

    fs = Locked(skip_instance_cache=True)
    fs.store, fs.pseudo_dirs = {}, [""]
    for key in ("lake/ok.jpg", "lake/notes.txt", "lake/locked/x.jpg", "lake/sub/y.jpg"):
        fs.pipe_file(key, b"x")
    left = LeftOut()
    listed = sorted(o.key for o in walk_generic(fs, Folder("/lake", recursive=True), (".jpg",), left))
    assert listed == ["/lake/ok.jpg", "/lake/sub/y.jpg"]
    assert {k: v for k, v in left.counts.items() if v} == {"extension": 1, "unreadable_folder": 1}

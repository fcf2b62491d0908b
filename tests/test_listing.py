"""Prefix listing in Ray tasks: exactly the objects the driver-side listing finds, split into disjoint key ranges."""

from __future__ import annotations

import datetime as dt
import time

import fsspec
import pytest

from clipn_core.errors import InputError
from clipn_core.storage import Storage
from jobs.inputs import list_objects
from jobs.score.listing import KeyRange, ObjectListing, start_after, successor

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


@pytest.mark.slow
def test_missing_and_empty_prefixes_fail_while_planning(s3_bucket, tmp_path, ray_local):
    bucket, opts = s3_bucket
    with pytest.raises(InputError, match="nothing-here"):
        ObjectListing(f"s3://{bucket}/nothing-here/", EXTS, Storage(opts))
    with pytest.raises(InputError, match="no-such-bucket"):
        ObjectListing("s3://no-such-bucket-for-clipn/x/", EXTS, Storage(opts))
    with pytest.raises(InputError, match="does not exist"):
        ObjectListing(str(tmp_path / "nope"), EXTS, Storage({}))

"""The scoring job's read step: concurrent fetches come back in input order, one request per object, and every
input keeps exactly one row, odd keys included."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest

from clipn_core.storage import Storage
from jobs.demo import world
from jobs.score.decode import DecodeSettings, read_decode_batch
from jobs.score.read import fetch, fetch_batch
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.slow
ODD_KEYS = ["with space.jpg", "ünïcödé.jpg", "hash#tag.jpg", "question?.jpg", "percent%41.jpg", "plus+sign.jpg",
            "star*.jpg", "[bracket].jpg"]


@pytest.fixture()
def objects(s3_bucket):
    """(storage through a proxy that delays a random half of the requests, {uri: bytes}, proxy)."""
    bucket, opts = s3_bucket
    fs = fsspec.filesystem("s3", **opts)
    content = {}
    for i, key in enumerate(ODD_KEYS + [f"plain_{i:02d}.jpg" for i in range(16)]):
        data = world.encode(world.render(world.SHAPES[i % 8], "red", i, 40))
        fs.pipe_file(f"{bucket}/lake/{key}", data)
        content[f"s3://{bucket}/lake/{key}"] = data
    proxy = FaultProxy(opts["client_kwargs"]["endpoint_url"], rate=0.5, kinds=("slow",), seed=3, slow_s=0.2)
    endpoint = proxy.start()
    storage = Storage({**opts, "client_kwargs": {**opts["client_kwargs"], "endpoint_url": endpoint}})
    yield storage, content, proxy
    proxy.stop()


def test_fetch_returns_every_object_in_input_order_with_one_get_each(objects):
    storage, content, proxy = objects
    missing = next(iter(content)).rsplit("/", 1)[0] + "/missing.jpg"
    uris = [*list(content)[::-1], missing]
    got = fetch(uris, storage, concurrency=8)  # slow answers finish out of order; results must not
    assert [g if isinstance(g, bytes) else None for g in got[:-1]] == [content[u] for u in uris[:-1]]
    assert isinstance(got[-1], FileNotFoundError), got[-1]
    assert proxy.counts["slow"] > 2  # the order really was scrambled
    object_requests = [(m, p) for (m, p, q), n in proxy.seen.items() for _ in range(n) if "/lake/" in p]
    assert len(object_requests) == len(uris) and {m for m, _ in object_requests} == {"GET"}, proxy.seen  # no HEAD


def test_read_decode_batch_keeps_one_row_per_input_in_order(objects, tiny):
    storage, content, _ = objects
    model, _, _ = tiny
    bucket_lake = next(iter(content)).rsplit("/", 1)[0]
    fs, _ = storage.fs(bucket_lake)
    fs.pipe_file(f"{bucket_lake[5:]}/broken.jpg", b"not an image at all")
    uris = [*content, f"{bucket_lake}/missing.jpg", f"{bucket_lake}/broken.jpg", *list(content)[:3]]
    settings = DecodeSettings(model.preprocess_cfg, "fast", "cpu", 10_000_000)
    out = read_decode_batch({"uri": np.array(uris, dtype=object)}, storage, settings, concurrency=4)
    assert out["uri"].tolist() == uris  # duplicates too: one row per input row
    statuses = out["status"].tolist()
    assert statuses == ["ok"] * len(content) + ["read_error", "not_an_image"] + ["ok"] * 3
    assert out["pixels"].shape == (len(uris), 3, 32, 32) and not out["pixels"][len(content)].any()
    assert out["byte_size"][len(content)] == -1 and out["error"][len(content)].startswith("FileNotFoundError")
    # the fetch-only step keeps the bytes instead
    raw = fetch_batch({"uri": np.array(uris, dtype=object)}, storage, concurrency=4)
    assert raw["uri"].tolist() == uris and raw["status"].tolist()[len(content)] == "read_error"
    assert [bytes(d) for d in raw["data"][: len(content)]] == list(content.values())

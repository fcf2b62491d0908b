"""Tar shards: streamed member by member in bounded batches, one rule for links, duplicates and torn shards,
skip_scored on members, and the row check (rows + skipped + left out = listed) for every input kind."""

from __future__ import annotations

import datetime as dt
import io
import os
import tarfile
from pathlib import Path

import fsspec.implementations.local as fs_local
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from clipn_core.storage import Storage
from jobs.demo import world
from jobs.score import run
from jobs.score.counts import InputCounts
from jobs.score.counts import totals as count_totals
from jobs.score.decode import DecodeSettings, read_tar_batch
from schemas.score_config import ScoreJobConfig

DAY = dt.date(2026, 11, 20)
CLASSES = ["circle", "square", "triangle"]


def _jpeg(i: int) -> bytes:
    return world.encode(world.render(world.SHAPES[i % 8], "red", i, 32))


def _shard(path: Path, members: list[tuple[str, object]]) -> bytes:
    """Write a tar of (name, bytes | ("sym" | "hard", target)) and return its bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if isinstance(payload, tuple):
                info.type = tarfile.SYMTYPE if payload[0] == "sym" else tarfile.LNKTYPE
                info.linkname = payload[1]
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture(scope="module")
def settings(tiny):
    model, _, _ = tiny
    return DecodeSettings(model.preprocess_cfg, "fast", "cpu", 10_000_000)


def _read(shard: Path, settings, rows_per_batch=4, skip=None, counts=None) -> list[dict]:
    batch = {"uri": np.array([str(shard)], dtype=object)}
    if skip is not None:
        batch["skip"] = np.array([np.array(skip, dtype=object)], dtype=object)
    return list(read_tar_batch(batch, Storage({}), settings, [".jpg"], rows_per_batch, counts))


class _CountingFile(io.RawIOBase):
    """A file object that records how many bytes have been read from it."""

    def __init__(self, f, log: list[int]):
        self.f, self.log = f, log

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    def readinto(self, b):
        n = self.f.readinto(b)
        self.log.append(self.log[-1] + n)
        return n

    def close(self):
        self.f.close()
        super().close()


@pytest.mark.parametrize("members", [10, 40])
def test_shard_is_streamed_in_bounded_batches(tmp_path, settings, monkeypatch, members):
    """Batches of at most rows_per_batch rows, and the first comes before most of the shard was read: the
    reader never holds the whole shard (the read position is counted through the file object)."""
    pad = os.urandom(64 << 10)  # 64 KiB of noise beside each image: a shard much larger than a batch
    size = len(_shard(tmp_path / "s.tar", [m for i in range(members)
                                           for m in ((f"{i:04d}.jpg", _jpeg(i)), (f"{i:04d}.bin", pad))]))
    read_at_yield: list[int] = []
    log = [0]
    real_open = fs_local.LocalFileSystem._open

    def counting_open(self, path, mode="rb", **kw):
        return io.BufferedReader(_CountingFile(real_open(self, path, mode, **kw), log), 1 << 16)

    monkeypatch.setattr(fs_local.LocalFileSystem, "_open", counting_open)
    batch = {"uri": np.array([str(tmp_path / "s.tar")], dtype=object)}
    sizes = []
    for out in read_tar_batch(batch, Storage({}), settings, [".jpg"], 4, None):
        sizes.append(len(out["uri"]))
        read_at_yield.append(log[-1])
        assert out["pixels"].shape[0] == len(out["uri"]) and out["pixels"].dtype == np.uint8
    assert sum(sizes) == members and max(sizes) <= 4 and len(sizes) == -(-members // 4)
    # 4 members of ~66 KiB each, plus the stream's read buffer: far from the whole shard
    assert read_at_yield[0] <= 4 * (len(pad) + 1024 + 2048) + (1 << 16) + 20 * 512
    assert read_at_yield[0] < size / 2 or members * (len(pad) + 4096) < 16 * (64 << 10)


def test_links_duplicates_and_skips_follow_one_rule(tmp_path, settings, ray_local):
    shard = tmp_path / "s.tar"
    _shard(shard, [("a.jpg", _jpeg(0)), ("a.json", b"{}"), ("./a.jpg", _jpeg(1)), ("sym.jpg", ("sym", "a.jpg")),
                   ("hard.jpg", ("hard", "a.jpg")), ("b.jpg", _jpeg(2)), ("c.jpg", _jpeg(3)), ("b.jpg", b"x")])
    counts = InputCounts.remote()
    out = _read(shard, settings, skip=["c.jpg", "gone.jpg"], counts=counts)
    rows = {u.rsplit("#", 1)[1]: (s, e) for o in out for u, s, e in zip(o["uri"], o["status"], o["error"])}
    assert sorted(rows) == ["a.jpg", "b.jpg", "hard.jpg", "sym.jpg"]  # one row per name; c.jpg skipped
    assert rows["a.jpg"][0] == rows["b.jpg"][0] == "ok"  # the first of two members named alike is kept
    assert rows["sym.jpg"][0] == rows["hard.jpg"][0] == "read_error"
    assert "symbolic link to 'a.jpg'" in rows["sym.jpg"][1] and "hard link" in rows["hard.jpg"][1]
    found, left_out = count_totals(counts)
    assert found == {"listed": 5, "skipped": 1, "shards": 1} and left_out == {"duplicate_member": 2, "extension": 1}
    assert found["listed"] == len(rows) + found["skipped"]


def _torn(data: bytes, kind: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    if kind == "cut_in_member":
        return data[: members[2].offset_data + 10]
    if kind == "cut_in_header":
        return data[: members[3].offset + 100]
    if kind == "cut_at_block":  # on a block boundary, after a whole member: tarfile alone sees a shorter shard
        return data[: members[3].offset]
    return b"this is not a tar archive at all" * 40


@pytest.mark.parametrize("kind", ["cut_in_member", "cut_in_header", "cut_at_block", "not_a_tar", "missing"])
def test_torn_or_missing_shard_keeps_every_input_one_row(tmp_path, settings, ray_local, kind):
    """Rows for the members read before the fault, and one read_error row (the shard URI) for the rest."""
    shard = tmp_path / "s.tar"
    data = _shard(shard, [(f"{i}.jpg", _jpeg(i)) for i in range(6)])
    if kind == "missing":
        shard.unlink()
    else:
        shard.write_bytes(_torn(data, kind))
    counts = InputCounts.remote()
    out = _read(shard, settings, rows_per_batch=2, counts=counts)
    uris = [u for o in out for u in o["uri"]]
    status = [s for o in out for s in o["status"]]
    assert uris[-1] == str(shard) and status[-1] == "read_error" and status.count("read_error") == 1
    assert "unreadable tar shard" in [e for o in out for e in o["error"]][-1]
    assert all(u.startswith(f"{shard}#") for u in uris[:-1]) and set(status[:-1]) <= {"ok"}
    assert len(uris) == len(set(uris))
    found, _ = count_totals(counts)
    assert found["listed"] == len(uris)


@pytest.mark.parametrize(("scored", "broadcast_max_rows"), [
    (["/l/a.tar#1.jpg", "/l/a.tar#2.jpg", "/l/c#x.tar#d#e.jpg", "/l/images/x.jpg", "/l/b.TAR#z.jpg", "/l/a.tar#1.jpg"],
     -1),  # hash join
    (["/l/a.tar#1.jpg", "/l/a.tar#2.jpg", "/l/c#x.tar#d#e.jpg", "/l/images/x.jpg", "/l/b.TAR#z.jpg", "/l/a.tar#1.jpg"],
     100),  # broadcast
    ([], -1),  # a scored set with nothing in it (every earlier row failed): broadcast, nothing to shuffle
], ids=["hash join", "broadcast", "nothing scored"])
def test_member_skips_attach_to_their_shards(ray_local, scored, broadcast_max_rows):
    """The skip set's member URIs grouped by shard (split at the first ``.tar#``: keys may hold ``#``), joined
    to every shard; a shard with nothing to skip gets None; the same broadcast or hash-joined."""
    import ray

    from jobs.score.incremental import attach_member_skips

    shards = ray.data.from_items([{"uri": u} for u in ("/l/a.tar", "/l/b.TAR", "/l/c#x.tar", "/l/d.tar")])
    scored_ds = ray.data.from_arrow(pa.table({"uri": pa.array(scored, pa.string())}))
    got = {r["uri"]: (sorted(r["skip"]) if r["skip"] is not None else None)
           for r in attach_member_skips(shards, scored_ds, broadcast_max_rows).take_all()}
    want = {"/l/a.tar": ["1.jpg", "2.jpg"], "/l/b.TAR": ["z.jpg"], "/l/c#x.tar": ["d#e.jpg"], "/l/d.tar": None}
    assert got == (want if scored else dict.fromkeys(want))


# ---------------------------------------------------------------- the job: skip_scored on members, the row check


def _lake(root: Path) -> dict[str, str]:
    """Six images (one broken) as a prefix, a manifest naming them, and two shards of them (a duplicate, a link)."""
    names = [f"i{i}.jpg" for i in range(5)] + ["bad.jpg"]
    data = {n: (b"broken" if n == "bad.jpg" else _jpeg(i)) for i, n in enumerate(names)}
    for n, d in data.items():
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "images" / n).write_bytes(d)
    pq.write_table(pa.table({"uri": [str(root / "images" / n) for n in names]}), root / "manifest.parquet")
    _shard(root / "shards" / "00000.tar", [(n, data[n]) for n in names[:3]] + [("i0.jpg", data["i1.jpg"])])
    _shard(root / "shards" / "00001.tar", [(n, data[n]) for n in names[3:]] + [("l.jpg", ("sym", "i3.jpg"))])
    return {"prefix": str(root / "images"), "manifest": str(root / "manifest.parquet"), "tar": str(root / "shards")}


def _cfg(uri: str, kind: str, out: Path, ckpt: str, day: dt.date, **output) -> ScoreJobConfig:
    return ScoreJobConfig.model_validate({
        "input": {"kind": kind, "uri": uri}, "output": {"uri": str(out), "run_date": str(day), **output},
        "model": {"checkpoint": ckpt}, "classes": {"names": CLASSES},
        "runtime": {"batch_size": 8, "decode_batch_size": 2}})


def _uris(out: Path, day: dt.date) -> list[str]:
    return sorted(pads.dataset(str(out / f"run_date={day}"), format="parquet").to_table(columns=["uri"])["uri"]
                  .to_pylist())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["prefix", "manifest", "tar"])
def test_row_check_and_skip_scored_for_every_input_kind(tmp_path, ckpt, ray_local, kind):
    """Two nights: every input counted (rows + skipped = listed; duplicate members left out, counted by reason), night 2 with skip_scored decodes only
    what failed transiently (tar: members, not shards), and the counts are exact."""
    uri = _lake(tmp_path / "lake")[kind]
    out = tmp_path / "out"
    first = run(_cfg(uri, kind, out, ckpt, DAY))
    expect = {"prefix": (6, 6, 0), "manifest": (6, 6, 0), "tar": (7, 7, 1)}[kind]
    assert (first.inputs_listed, first.rows, first.left_out.get("duplicate_member", 0)) == expect
    assert first.skipped_already_scored == 0 and len(set(_uris(out, DAY))) == first.rows
    # bad.jpg: not_an_image, a permanent failure of an unchanged object, skipped like the ok rows; the tar's link
    # member l.jpg: read_error, transient, so read again (output.retry_nights)
    transient = first.by_status.get("read_error", 0)
    assert transient == (1 if kind == "tar" else 0)
    second = run(_cfg(uri, kind, out, ckpt, DAY + dt.timedelta(days=1), skip_scored=True))
    assert second.skipped_already_scored == first.rows - transient and second.inputs_listed == first.inputs_listed
    assert second.rows == transient and second.by_status.get("ok", 0) == 0
    assert second.rows + second.skipped_already_scored == second.inputs_listed
    assert (second.retried, second.healed) == (transient, 0)
    if kind == "tar":
        assert {u.rsplit("/", 1)[1] for u in _uris(out, DAY + dt.timedelta(days=1))} == {"00001.tar#l.jpg"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["prefix", "manifest", "tar"])
def test_row_count_mismatch_refuses_to_publish(tmp_path, ckpt, ray_local, monkeypatch, kind):
    """A lost row (forced: the staged count comes back one short) refuses the night and leaves nothing visible."""
    import jobs.score.pipeline as pipeline

    uri = _lake(tmp_path / "lake")[kind]
    out = tmp_path / "out"
    real = pipeline.staged_stats

    def one_lost(*a, **kw):
        stats = real(*a, **kw)
        return {**stats, "rows": stats["rows"] - 1}

    monkeypatch.setattr(pipeline, "staged_stats", one_lost)
    with pytest.raises(RuntimeError, match=r"row check failed: wrote (\d+) rows, expected (\d+) = ") as e:
        run(_cfg(uri, kind, out, ckpt, DAY))
    assert int(e.value.args[0].split()[4]) + 1 == int(e.value.args[0].split()[7])
    part = out / f"run_date={DAY}"
    assert not (part / "_manifest.json").exists() and not (part / "_SUCCESS").exists()
    assert not list(out.rglob("*.parquet"))


@pytest.mark.slow
@pytest.mark.parametrize("kind, lost", [("manifest", "wrote 5 rows, expected 6"), ("tar", "1 of 2 shards")])
def test_an_input_lost_before_it_is_counted_refuses_the_night(tmp_path, ckpt, ray_local, monkeypatch, kind, lost):
    """What the driver knows must be accounted for (a Parquet manifest's lines from its metadata, the shards it
    listed) is checked against what the read tasks counted: a shard or a manifest block lost on the way is caught,
    not published as a smaller night."""
    from dataclasses import replace

    from ray.data.expressions import col

    import jobs.score.pipeline as pipeline

    uri = _lake(tmp_path / "lake")[kind]
    out = tmp_path / "out"
    real = pipeline.input_dataset

    def lossy(*a, **kw):
        inputs = real(*a, **kw)
        first = sorted(r["uri"] for r in inputs.dataset.take_all())[0]
        return replace(inputs, dataset=inputs.dataset.filter(expr=col("uri") != first))

    monkeypatch.setattr(pipeline, "input_dataset", lossy)
    with pytest.raises(RuntimeError, match=f"row check failed: {lost}"):
        run(_cfg(uri, kind, out, ckpt, DAY))
    assert not list(out.rglob("*.parquet")) and not list(out.rglob("_manifest.json"))

"""Small Parquet reads of the jobs: Ray Data's V1 reader (no footer-reader actors), the process's own choice restored;
larger ones: Ray's reader."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from jobs import parquet_read
from jobs.parquet_read import V1_MAX_FILES, read_parquet


def _files(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"part-{i}.parquet"
        pq.write_table(pa.table({"uri": [f"u{i}"]}), path)
        out.append(str(path))
    return out


@pytest.fixture()
def seen(monkeypatch):
    """Ray's read_parquet replaced by one that records the context's reader choice when it is called."""
    ctx = parquet_read.ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "use_datasource_v2", True)
    calls = []

    def fake(paths, filesystem=None, **kwargs):
        calls.append((paths, ctx.use_datasource_v2, kwargs))
        if kwargs.get("fail"):
            raise ValueError("no such file")
        return "dataset"

    monkeypatch.setattr(parquet_read.ray.data, "read_parquet", fake)
    return calls, ctx


@pytest.mark.parametrize(("form", "v1"), [("files", True), (f"{V1_MAX_FILES} files", True), ("one file", True),
                                          (f"{V1_MAX_FILES + 1} files", False), ("folder", False)])
def test_small_reads_take_v1_larger_ones_rays_reader_and_the_context_is_restored(tmp_path, seen, form, v1):
    calls, ctx = seen
    files = _files(tmp_path / "night", V1_MAX_FILES + 1)
    paths = {"files": files[:3], f"{V1_MAX_FILES} files": files[:-1], "one file": files[0],
             f"{V1_MAX_FILES + 1} files": files, "folder": str(tmp_path / "night")}[form]
    assert read_parquet(paths, pafs.LocalFileSystem(), partitioning=None) == "dataset"
    assert calls == [(paths, not v1, {"partitioning": None})]
    assert ctx.use_datasource_v2 is True
    with pytest.raises(ValueError, match="no such file"):  # restored when Ray raises inside the V1 window too
        read_parquet(files[:3], pafs.LocalFileSystem(), fail=True)
    assert calls[-1][1] is False and ctx.use_datasource_v2 is True


def test_v1_reads_ask_for_each_files_size_in_turn():
    """Ray's V1 reader asks for file sizes one by one only below this threshold; from it, on S3, it lists the files'
    common folder or starts Ray tasks, which the bound exists to avoid (if a Ray upgrade moves it, this fails)."""
    from ray.data.datasource.file_based_datasource import FILE_SIZE_FETCH_PARALLELIZATION_THRESHOLD

    assert V1_MAX_FILES < FILE_SIZE_FETCH_PARALLELIZATION_THRESHOLD


def test_a_process_that_chose_v1_keeps_it(tmp_path, seen):
    calls, ctx = seen
    ctx.use_datasource_v2 = False
    read_parquet(_files(tmp_path, 2), pafs.LocalFileSystem())
    assert calls[0][1] is False and ctx.use_datasource_v2 is False


def _footer_pool(ds) -> int | None:
    """The FooterReader pool of a V2 read (None: no footer listing, the V1 reader)."""
    op = ds._logical_plan.dag
    while op.input_dependencies:
        op = op.input_dependencies[0]
    indexer = getattr(op, "file_indexer", None)
    return getattr(indexer, "_num_actors", None)


def test_the_jobs_reads_start_no_footer_actors_and_other_reads_keep_rays_reader(tmp_path, ray_local):
    """The mechanism relied on (if a Ray upgrade changes it, this fails): the reader is chosen when read_parquet
    creates the dataset, so the dataset keeps V1 after the context is restored; a plain read_parquet of the same
    process, after it, keeps Ray's default (V2 and its footer pool)."""
    files = _files(tmp_path, 3)
    ours = read_parquet(files, pafs.LocalFileSystem(), include_paths=True, partitioning=None)
    assert _footer_pool(ours) is None
    assert _footer_pool(ray_local.data.read_parquet(files, filesystem=pafs.LocalFileSystem())) == 32
    assert _footer_pool(read_parquet(str(tmp_path), pafs.LocalFileSystem())) == 32  # a folder: Ray's reader
    rows = ours.take_all()
    assert sorted(r["uri"] for r in rows) == ["u0", "u1", "u2"]
    assert sorted(r["path"] for r in rows) == sorted(files)

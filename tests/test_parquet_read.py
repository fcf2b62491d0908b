"""Parquet reads through Ray Data: the footer-reader pool sized to the files read, the operator's setting kept."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from jobs import parquet_read
from jobs.parquet_read import FOOTER_ACTORS_ENV, FOOTER_BATCH_ENV, footer_actors, read_parquet


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
    """Ray's read_parquet replaced by one that records the pool size in the environment when it is called."""
    monkeypatch.delenv(FOOTER_ACTORS_ENV, raising=False)
    monkeypatch.delenv(FOOTER_BATCH_ENV, raising=False)
    monkeypatch.setattr(parquet_read.ray, "is_initialized", lambda: True)
    calls = []

    def fake(paths, filesystem=None, **kwargs):
        calls.append((paths, os.environ.get(FOOTER_ACTORS_ENV), kwargs))
        if kwargs.get("fail"):
            raise ValueError("no such file")
        return "dataset"

    monkeypatch.setattr(parquet_read.ray.data, "read_parquet", fake)
    return calls


@pytest.mark.parametrize(("n_files", "actors"), [(0, 1), (1, 1), (10, 1), (11, 2), (95, 10), (320, 32), (5000, 32)])
def test_the_pool_is_one_actor_per_footer_batch_up_to_rays_default(n_files, actors, monkeypatch):
    monkeypatch.delenv(FOOTER_BATCH_ENV, raising=False)
    assert footer_actors(n_files) == actors


@pytest.mark.parametrize("form", ["files", "folder", "one file"])
def test_every_form_of_paths_sizes_the_pool_and_restores_the_environment(tmp_path, seen, form):
    files = _files(tmp_path / "night", 12)
    fs = pafs.LocalFileSystem()
    paths = {"files": files, "folder": str(tmp_path / "night"), "one file": files[0]}[form]
    assert read_parquet(paths, fs, partitioning=None) == "dataset"
    assert seen == [(paths, "1" if form == "one file" else "2", {"partitioning": None})]
    assert FOOTER_ACTORS_ENV not in os.environ
    with pytest.raises(ValueError, match="no such file"):  # restored when Ray raises too
        read_parquet(files, fs, fail=True)
    assert FOOTER_ACTORS_ENV not in os.environ


def test_a_pool_size_the_operator_set_is_kept(tmp_path, seen, monkeypatch):
    monkeypatch.setenv(FOOTER_ACTORS_ENV, "8")
    read_parquet(_files(tmp_path, 2), pafs.LocalFileSystem())
    assert seen[0][1] == "8" and os.environ[FOOTER_ACTORS_ENV] == "8"


def test_before_ray_starts_nothing_is_set(tmp_path, seen, monkeypatch):
    """read_parquet would start Ray inside the override, and Ray's processes would keep it for the session."""
    monkeypatch.setattr(parquet_read.ray, "is_initialized", lambda: False)
    read_parquet(_files(tmp_path, 2), pafs.LocalFileSystem())
    assert seen[0][1] is None


def _footer_pool(ds) -> int:
    op = ds._logical_plan.dag
    while op.input_dependencies:
        op = op.input_dependencies[0]
    return op.file_indexer._num_actors


def test_ray_builds_its_footer_pool_at_the_call_and_other_reads_keep_rays_default(tmp_path, ray_local, monkeypatch):
    """The mechanism the sizing relies on (if a Ray upgrade moves it, this fails): Ray Data reads the pool size
    when read_parquet plans the read, so the dataset keeps it after the environment is restored; a plain
    read_parquet of the same process, before and after, keeps Ray's default (its module default is not frozen at
    our size by a first import inside the override)."""
    monkeypatch.delenv(FOOTER_ACTORS_ENV, raising=False)
    monkeypatch.delenv(FOOTER_BATCH_ENV, raising=False)
    files = _files(tmp_path, 25)
    sized = read_parquet(files, pafs.LocalFileSystem())
    assert _footer_pool(sized) == 3
    assert _footer_pool(ray_local.data.read_parquet(files[:3], filesystem=pafs.LocalFileSystem())) == 32
    assert _footer_pool(read_parquet(files[:3], pafs.LocalFileSystem())) == 1
    assert sorted(r["uri"] for r in sized.take_all()) == sorted(f"u{i}" for i in range(25))

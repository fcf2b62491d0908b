"""Reliability: storage faults, dead workers, a dead driver and bad setups never lose or duplicate a row.

Every case runs the real jobs against the loopback S3 server (through a fault-injecting
proxy where the case says so) and records one line of the table printed at the end:
fault, faults injected, rows expected, rows written, rows lost, rows duplicated.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

import clipn_core as cc
from clipn_core.storage import sha256_file
from jobs.cli import main as cli_main
from jobs.demo.world import World
from jobs.failpoints import ENV as FAILPOINTS_ENV
from jobs.failpoints import KILLED_EXIT
from jobs.score import run
from schemas.score_config import ScoreJobConfig
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.slow

DAY = dt.date(2026, 11, 24)
N_IMAGES = 40
BROKEN = {"broken_empty.jpg": b"", "broken_text.jpg": b"plain text\n"}
ROWS: list[tuple] = []
# the name of the test report property that carries a test's table rows to conftest's terminal summary (under
# pytest-xdist the test runs in a worker process, the summary in the controller)
PROPERTY = "reliability_row"


def table_lines(rows: list[tuple]) -> list[str]:
    """The reliability table of ``rows`` (this session's cases; printed by conftest's terminal summary)."""
    head = ("fault", "injected", "rows expected", "rows written", "rows lost", "rows duplicated")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head, *rows]]


@pytest.fixture(autouse=True)
def _report_rows(request):
    """Hand the rows a test adds to its report (its ``user_properties``), which reach the terminal summary from
    any process."""
    before = len(ROWS)
    yield
    request.node.user_properties.extend((PROPERTY, row) for row in ROWS[before:])


def record(fault: str, injected: int, expected: list[str], written: list[str]) -> None:
    """Add a table row and assert nothing was lost or duplicated."""
    counts = Counter(written)
    lost = len(set(expected) - set(counts))
    duplicated = sum(n - 1 for n in counts.values())
    ROWS.append((fault, injected, len(expected), len(written), lost, duplicated))
    assert lost == 0 and duplicated == 0 and len(written) == len(expected), ROWS[-1]


@pytest.fixture(scope="module")
def lake(s3_server, ray_local):
    """A bucket with N_IMAGES world images + 2 broken files and a tiny checkpoint, written directly (no faults)."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="rel")
    opts = {"client_kwargs": {"endpoint_url": s3_server}, "skip_instance_cache": True}
    uris = list(World(seed=5).write_lake("s3://rel/lake", N_IMAGES, opts))
    fs = fsspec.filesystem("s3", **opts)
    for name, data in BROKEN.items():
        fs.pipe_file(f"rel/lake/{name}", data)
        uris.append(f"s3://rel/lake/{name}")
    model, spec = cc.build_clipn("clipn-tiny", seed=4)
    cc.save_checkpoint(model, spec, "s3://rel/models/clipn.safetensors", opts)
    return {"endpoint": s3_server, "opts": opts, "uris": sorted(uris)}


def _cfg(lake, out: str, endpoint: str | None = None, **runtime) -> ScoreJobConfig:
    return ScoreJobConfig.model_validate({
        "input": {"kind": "prefix", "uri": "s3://rel/lake"},
        "output": {"uri": out, "run_date": str(DAY)},
        "model": {"checkpoint": "s3://rel/models/clipn.safetensors"},
        "classes": {"names": list(World().id_shapes)},
        "templates": "world",
        "storage": {"endpoint_url": endpoint or lake["endpoint"]},
        "runtime": {"batch_size": 4, "decode_batch_size": 4, **runtime},
    })


def _published(lake, out: str):
    """The night as readers of ours see it (the files its manifest names), or None when it is not published."""
    from clipn_core.storage import Storage
    from jobs.score.publish import night_files, published_nights

    storage = Storage(lake["opts"] if out.startswith("s3://") else {})
    fs, _ = storage.fs(out)
    nights = [(part, m) for part, m in published_nights(out, storage) if m.run_date == DAY]
    if not nights:
        return None
    files = night_files(fs, *nights[0])
    return pads.dataset(files, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)), format="parquet").to_table(
        columns=["uri", "status", "predicted_class", "score_ctw", "score_atd", "score_mcm", "is_ood"]).sort_by("uri")


@pytest.fixture(scope="module")
def baseline(lake):
    """The fault-free run every faulty run must reproduce."""
    run(_cfg(lake, "s3://rel/out-baseline"))
    table = _published(lake, "s3://rel/out-baseline")
    record("none (baseline)", 0, lake["uris"], table["uri"].to_pylist())
    return table


def _same_rows_and_scores(table, baseline) -> None:
    assert table["uri"].to_pylist() == baseline["uri"].to_pylist()
    assert table["status"].to_pylist() == baseline["status"].to_pylist()
    assert table["predicted_class"].to_pylist() == baseline["predicted_class"].to_pylist()
    for col in ("score_ctw", "score_atd", "score_mcm"):
        np.testing.assert_array_equal(table[col].to_numpy(zero_copy_only=False),
                                      baseline[col].to_numpy(zero_copy_only=False))


def test_scoring_under_10_percent_storage_faults_equals_the_fault_free_run(lake, baseline):
    proxy = FaultProxy(lake["endpoint"], rate=0.10, seed=1)
    endpoint = proxy.start()
    try:
        run(_cfg(lake, "s3://rel/out-faults", endpoint))
    finally:
        proxy.stop()
    assert all(n > 0 for n in proxy.counts.values()), proxy.counts  # every kind was exercised
    table = _published(lake, "s3://rel/out-faults")
    record(f"S3 10% of {proxy.requests} requests ({', '.join(f'{k} {v}' for k, v in proxy.counts.items())})",
           proxy.injected, lake["uris"], table["uri"].to_pylist())
    _same_rows_and_scores(table, baseline)


@pytest.mark.parametrize("where", ["scorer", "decode"])
def test_a_killed_worker_is_replaced_and_every_input_has_one_row(lake, baseline, tmp_path, monkeypatch, where):
    marker = tmp_path / f"{where}.killed"
    monkeypatch.setenv(FAILPOINTS_ENV, f"score.{where}.batch=kill,at=3,once={marker}")
    out = f"s3://rel/out-kill-{where}"
    run(_cfg(lake, out))
    assert marker.exists()  # the worker really died
    table = _published(lake, out)
    record(f"{where} worker killed (os._exit) at its 3rd batch", 1, lake["uris"], table["uri"].to_pylist())
    _same_rows_and_scores(table, baseline)


def _taking_over(cfg: ScoreJobConfig, dead_run: str) -> ScoreJobConfig:
    """``cfg`` for a rerun that takes the lease of ``dead_run`` at once (what an operator does after a crash)."""
    data = cfg.model_dump(mode="json")
    data["output"]["take_over_lease"] = dead_run
    return ScoreJobConfig.model_validate(data)


def test_driver_killed_before_publishing_then_rerun(lake, baseline, tmp_path, ray_local):
    """The driver dies with the whole run staged: nothing becomes visible; its lease holds the night until it
    is taken over; the rerun publishes everything once and removes the dead run's staging."""
    from clipn_core.errors import LeaseHeldError

    out = "s3://rel/out-driver"
    cfg_file = tmp_path / "score.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(lake, out).model_copy(update={"run_id": "killed"})
                                       .model_dump(mode="json", exclude_none=True)))
    marker = tmp_path / "driver.killed"
    env = {**os.environ, FAILPOINTS_ENV: f"score.staged=kill,once={marker}",
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-m", "jobs", "score", "--config", str(cfg_file)], env=env,
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert proc.returncode == KILLED_EXIT and marker.exists(), proc.stderr[-2000:]
    assert _published(lake, out) is None  # the failed attempt never became visible
    fs = fsspec.filesystem("s3", **lake["opts"])
    staged = [p for p in fs.find("rel/out-driver/_staging") if p.endswith(".parquet")]
    assert staged  # it had written its rows, only to staging

    with pytest.raises(LeaseHeldError, match="run killed"):  # its heartbeat is fresh: it looks alive
        run(_cfg(lake, out))
    run(_taking_over(_cfg(lake, out), "killed"))  # the rerun of the same run date
    table = _published(lake, out)
    record("driver killed after staging, rerun", 1, lake["uris"], table["uri"].to_pylist())
    _same_rows_and_scores(table, baseline)
    fs.invalidate_cache()  # this filesystem listed the staging before the rerun changed it
    assert not fs.find("rel/out-driver/_staging") and not fs.find("rel/out-driver/_leases"), fs.find("rel/out-driver")


@pytest.mark.parametrize("store", ["local folder", "S3"])
def test_two_runs_of_one_night_started_together_leave_one_copy_and_the_loser_says_why(lake, baseline, tmp_path,
                                                                                   ray_local, store):
    """Two ``clipn score`` processes of the same output and night start at once. Whichever takes the night's
    lease first holds it (a failpoint pauses it there, so that the other surely tries while it is held); the
    other exits 75 with one line naming it, having written nothing; the winner then publishes a clean run's
    rows."""
    import time

    from clipn_core.errors import LeaseHeldError

    out = str(tmp_path / "out") if store == "local folder" else "s3://rel/out-together"
    release = tmp_path / "release"
    env = {FAILPOINTS_ENV: f"lease.acquired=pause,until={release}"}
    procs = {name: _submit(_cfg(lake, out).model_copy(update={"run_id": name}), tmp_path, name, ray_local, env)
             for name in ("runA", "runB")}
    deadline = time.monotonic() + 300
    while all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    done = [name for name, p in procs.items() if p.poll() is not None]
    assert len(done) == 1, "neither run stopped at the other's lease"
    loser, winner = done[0], ({"runA", "runB"} - set(done)).pop()
    _, err = procs[loser].communicate()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert procs[loser].returncode == LeaseHeldError.exit_code == 75, err[-2000:]
    assert len(errors) == 1 and f"run {winner}" in errors[0] and "wrote nothing" in errors[0], err[-2000:]
    assert _published(lake, out) is None  # the winner still holds the night, unpublished; the loser wrote nothing
    release.touch()
    _, err = procs[winner].communicate(timeout=300)
    assert procs[winner].returncode == 0, err[-2000:]
    table = _published(lake, out)
    record(f"two runs of one night started together ({store})", 1, lake["uris"], table["uri"].to_pylist())
    _same_rows_and_scores(table, baseline)


def test_training_under_10_percent_storage_faults_completes(lake, tmp_path):
    """Pairs, run checkpoints and the final checkpoint all behind the faulty proxy."""
    from jobs.train import run as run_train
    from schemas.train_config import TrainJobConfig
    from tests.test_train_job import history, make_pairs, pairs_table, train_cfg

    fs = fsspec.filesystem("s3", **lake["opts"])
    buf = io.BytesIO()
    pq.write_table(pairs_table(make_pairs(96)), buf)
    fs.pipe_file("rel/pairs/part-0.parquet", buf.getvalue())
    proxy = FaultProxy(lake["endpoint"], rate=0.10, seed=2)
    endpoint = proxy.start()
    try:
        cfg = TrainJobConfig.model_validate(train_cfg(
            "s3://rel/pairs", tmp_path, "faulty", loop__steps=6, loop__checkpoint_every=3, loop__log_every=3,
            run__num_workers=1, run__storage_path="s3://rel/runs", output__checkpoint="s3://rel/models/faulty.safetensors",
            storage={"endpoint_url": endpoint}))
        summary = run_train(cfg)
    finally:
        proxy.stop()
    assert summary["steps"] == 6 and proxy.injected > 0, proxy.counts
    steps = [h["step"] for h in history("s3://rel/models/faulty.safetensors", lake["opts"])]
    record(f"training, S3 10% of {proxy.requests} requests (steps as rows)", proxy.injected,
           [str(i) for i in range(1, 7)], [str(s) for s in steps])


def _bad_setup_cases(lake, tmp_path) -> dict[str, tuple[list[str], str]]:
    base = ["score", "--output.run_date", str(DAY), "--storage.endpoint_url", lake["endpoint"]]
    good = {"--input.uri": "s3://rel/lake", "--model.checkpoint": "s3://rel/models/clipn.safetensors",
            "--classes.names": json.dumps(list(World().id_shapes))}
    small = tmp_path / "small.safetensors"
    other, other_spec = cc.build_clipn("clipn-small", seed=0)
    cc.save_checkpoint(other, other_spec, str(small))
    # a checkpoint whose weights are another architecture's than its sidecar says
    mixed = tmp_path / "mixed.safetensors"
    mixed.write_bytes(small.read_bytes())
    tiny_sidecar = json.loads(fsspec.filesystem("s3", **lake["opts"]).cat_file("rel/models/clipn.json"))
    mixed.with_suffix(".json").write_text(json.dumps({**tiny_sidecar, "sha256": sha256_file(mixed)}))
    bad_templates = tmp_path / "templates.txt"
    bad_templates.write_bytes(b"\xff\xfe not utf-8 {}\n")

    def args(**over):
        merged = {**good, **over}
        return [*base, *(x for kv in merged.items() for x in kv)]

    return {
        "missing bucket": (args(**{"--input.uri": "s3://no-such-bucket/lake"}), "no-such-bucket"),
        "empty prefix": (args(**{"--input.uri": "s3://rel/nothing-here/"}), "rel/nothing-here"),
        "empty class list": (args(**{"--classes.names": "[]"}), "class list is empty"),
        "duplicated class list": (args(**{"--classes.names": '["circle", "circle"]'}), "duplicated class"),
        "checkpoint of another architecture": (args(**{"--model.checkpoint": str(mixed)}), "mixed.safetensors"),
        "unreadable template file": ([*args(), "--templates", str(bad_templates)], "templates.txt"),
    }


@pytest.mark.parametrize("case", ["missing bucket", "empty prefix", "empty class list", "duplicated class list",
                                  "checkpoint of another architecture", "unreadable template file",
                                  "wrong credentials"])
def test_bad_setup_fails_with_one_clear_error_and_writes_nothing(lake, tmp_path, capsys, monkeypatch, case):
    out = f"s3://rel/out-bad-{case.replace(' ', '-')}"
    if case == "wrong credentials":
        # moto accepts any key; the proxy plays an S3 that refuses them (403 InvalidAccessKeyId)
        proxy = FaultProxy(lake["endpoint"], rate=0.0)
        endpoint = proxy.start()
        proxy.deny_access = True
        argv = ["score", "--output.run_date", str(DAY), "--storage.endpoint_url", endpoint,
                "--input.uri", "s3://rel/lake", "--model.checkpoint", "s3://rel/models/clipn.safetensors",
                "--classes.names", json.dumps(list(World().id_shapes)), "--output.uri", out]
        try:
            code = cli_main(argv)
        finally:
            proxy.stop()
        needle = "access denied"
    else:
        argv, needle = _bad_setup_cases(lake, tmp_path)[case]
        code = cli_main([*argv, "--output.uri", out])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith(("error:", "config error:")) and needle in err[0], err
    assert "testing" not in err[0]  # no credentials in messages
    fs = fsspec.filesystem("s3", **lake["opts"])
    assert not fs.exists(out.removeprefix("s3://"))  # nothing written
    ROWS.append((f"bad setup: {case}", "-", 0, 0, 0, 0))


# ------------------------------------------------------------------ the Iceberg target


def _iceberg_cfg(lake, tmp_path, table: str, warehouse: str, endpoint: str | None = None, **runtime) -> ScoreJobConfig:
    data = _cfg(lake, "unused", endpoint, **runtime).model_dump(mode="json")
    data["output"] = {"iceberg": {"table": table, "uri": f"sqlite:///{tmp_path / 'catalog.db'}", "warehouse": warehouse},
                      "run_date": str(DAY)}
    return ScoreJobConfig.model_validate(data)


def _table_rows(cfg: ScoreJobConfig) -> tuple[list[dict], object]:
    from jobs.score.iceberg import load_table

    table = load_table(cfg.output.iceberg, cfg.storage.bind(), create=False)
    rows = table.scan(selected_fields=("uri", "status", "predicted_class", "score_ctw", "score_atd", "score_mcm",
                                       "is_ood", "run_id")).to_arrow().sort_by("uri")
    return rows, table


def _same_as_baseline(rows, baseline) -> None:
    _same_rows_and_scores(rows.select(baseline.column_names), baseline)


def _submit(cfg: ScoreJobConfig, tmp_path: Path, name: str, ray_local, env: dict | None = None) -> subprocess.Popen:
    cfg_file = tmp_path / f"{name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    return subprocess.Popen([sys.executable, "-m", "jobs", "score", "--config", str(cfg_file)],
                            env={**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, **(env or {})},
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_iceberg_driver_killed_before_the_commit_leaves_the_last_snapshot_then_rerun(lake, baseline, tmp_path, ray_local):
    from jobs.score.iceberg import commit_night
    from schemas.manifest import ScoreManifest
    from tests.iceberg_rows import night_file

    cfg = _iceberg_cfg(lake, tmp_path, "rel.killed", f"file://{tmp_path / 'wh'}")
    # an earlier night in the table (committed directly: its rows only need to survive)
    yesterday = DAY - dt.timedelta(days=1)
    earlier = ScoreManifest(schema_version=1, run_id="earlier", run_date=yesterday, partition="", model_id="m",
                            class_set_hash="h", classes=[], templates=[], rows=1, files=1, by_status={"ok": 1},
                            ood_rate={}, timings_s={}, config={})
    commit_night(cfg.output.iceberg, cfg.storage.bind(),
                 [night_file(tmp_path / "earlier", "earlier", ["s3://rel/old.jpg"], yesterday)], earlier)
    _, table = _table_rows(cfg)
    before = table.current_snapshot().snapshot_id
    marker = tmp_path / "driver.killed"
    proc = _submit(cfg.model_copy(update={"run_id": "killed"}), tmp_path, "killed", ray_local,
                   {FAILPOINTS_ENV: f"score.staged=kill,once={marker}"})
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == KILLED_EXIT and marker.exists(), err[-2000:]
    rows, table = _table_rows(cfg)
    assert table.current_snapshot().snapshot_id == before and rows["uri"].to_pylist() == ["s3://rel/old.jpg"]
    run(_taking_over(cfg, "killed"))  # the rerun of the same night
    rows, _ = _table_rows(cfg)
    night_rows = rows.filter(pc.field("run_id") != "earlier")
    assert len(rows) == len(night_rows) + 1  # the earlier night stands beside it
    record("Iceberg: driver killed before the commit, rerun", 1, lake["uris"], night_rows["uri"].to_pylist())
    _same_as_baseline(night_rows, baseline)


def test_iceberg_two_runs_committing_at_once_leave_one_copy_of_the_night(lake, baseline, tmp_path, ray_local,
                                                                       monkeypatch):
    """Two runs of one night whose commits collide, made deterministic: run B read the table before run A
    committed, so the catalog refuses B's first commit; B retries against A's snapshot and its rows replace
    A's. (Two jobs started together rarely commit within the same milliseconds.)"""
    from jobs.score import iceberg

    cfg = _iceberg_cfg(lake, tmp_path, "rel.race", f"file://{tmp_path / 'wh'}")
    before_a = iceberg.load_table(cfg.output.iceberg, cfg.storage.bind(), create=True)  # what B read
    a = run(cfg.model_copy(update={"run_id": "runA"}))
    real, commits = iceberg.load_table, []

    def b_reads_before_a(*args, create=False, **kwargs):
        if create:  # commit_night's loads
            commits.append(1)
            if len(commits) == 1:
                return before_a
        return real(*args, create=create, **kwargs)

    monkeypatch.setattr(iceberg, "load_table", b_reads_before_a)
    b = run(cfg.model_copy(update={"run_id": "runB"}))
    monkeypatch.undo()
    assert len(commits) == 2  # B's first commit lost to A's, its retry won
    rows, table = _table_rows(cfg)
    assert set(rows["run_id"].to_pylist()) == {"runB"} and a.rows == b.rows == len(rows)
    record("Iceberg: two runs of one night, the second's commit collides", 1, lake["uris"], rows["uri"].to_pylist())
    _same_as_baseline(rows, baseline)


def test_iceberg_under_10_percent_storage_faults(lake, baseline, tmp_path):
    proxy = FaultProxy(lake["endpoint"], rate=0.10, seed=4)
    endpoint = proxy.start()
    try:
        cfg = _iceberg_cfg(lake, tmp_path, "rel.faults", "s3://rel/warehouse", endpoint)
        run(cfg)
        rows, _ = _table_rows(cfg)
    finally:
        proxy.stop()
    assert proxy.injected > 0, proxy.counts
    record(f"Iceberg: S3 10% of {proxy.requests} requests (warehouse and lake)", proxy.injected, lake["uris"],
           rows["uri"].to_pylist())
    _same_as_baseline(rows, baseline)

"""Shared fixtures: a tiny CLIPN, one S3 server on loopback (moto, used like MinIO), one local Ray."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid

import pytest

# Never reach a model hub from tests; everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train runs (read at each fit, handed to its controller): no preemption watcher, an actor process per worker
# group start that only listens for cloud preemption notices; the controller polls its workers every 0.5 s, not
# 2 s, so a run's end, a report's checkpoint and a dead worker are seen sooner.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray starts its workers at nice 15 (to keep its own daemons responsive): beside any CPU-bound process at nice 0 (a
# shared CI machine, `stress-ng --cpu 2`) every Ray task, actor and Ray Train worker gets about 3% of a CPU and the
# suite crawls. Test workers compete as the test process itself does.
os.environ.setdefault("RAY_worker_niceness", "0")
# A fresh local cache (weights, class heads, negatives) per test run: an entry a past run left under a key
# that no longer says everything would otherwise let a test pass on stale heads. pytest-xdist's workers inherit
# the controller's environment, so they share the run's cache (entries are written atomically) instead of each
# encoding the same heads and mining the same negative labels; the process that made it removes it.
if "CLIPN_TEST_RUN_CACHE" not in os.environ:
    os.environ["CLIPN_TEST_RUN_CACHE"] = tempfile.mkdtemp(prefix="clipn-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CLIPN_TEST_RUN_CACHE"], ignore_errors=True)
os.environ["CLIPN_CACHE_DIR"] = os.environ["CLIPN_TEST_RUN_CACHE"]

TINY = "clipn-tiny"


@pytest.fixture(scope="session")
def tiny():
    """(model, spec, tokenizer) of a seeded random clipn-tiny CLIPN, shared read-only."""
    import clipn_core as cc

    model, spec = cc.build_clipn(TINY, seed=0)
    return model, spec, cc.get_tokenizer(model)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A saved clipn-tiny checkpoint (seed 1) for end-to-end jobs, written once per session."""
    import clipn_core as cc

    model, spec = cc.build_clipn(TINY, seed=1)
    path = str(tmp_path_factory.mktemp("ckpt") / "m.safetensors")
    cc.save_checkpoint(model, spec, path)
    return path


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 at a free port; yields its endpoint URL; stops at session end."""
    from jobs.demo import start_moto

    server, endpoint = start_moto()
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(request):
    """(bucket name, storage_options) of a fresh bucket on the loopback S3 server."""
    import boto3

    # a test that reaches this fixture through request.getfixturevalue escapes the collection-time marking:
    # refuse it before the server starts, so `make test-fast` never starts one
    assert request.node.get_closest_marker("slow"), f"{request.node.nodeid} starts the S3 server: mark it slow"
    s3_server = request.getfixturevalue("s3_server")

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=name)
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }
    return name, options


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray with 2 CPUs for the session (started after the S3 env so workers inherit it)."""
    import ray

    # --- scoring-job session costs (issue 25); each changes how fast, never what a job computes ---
    # Workers flush metrics every 10 s by default: a test reading a run's metrics waited up to that per run.
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    # Ray kills a task worker 1 s after it idles once the workers outnumber the CPUs (the scorer and Ray Data's
    # own actors count), so each job's read, decode and write tasks paid a fresh interpreter and its imports
    # again: kept for the session, a 30-image job took 4.9 s instead of 5.8 (mean of 8 warm runs each).
    keep_workers = {"num_workers_soft_limit": 8, "idle_worker_killing_time_threshold_ms": 600_000}
    # "local": always a new instance, never a cluster another process started (under pytest-xdist each worker
    # process has its own session, and so its own Ray)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             _system_config=keep_workers)
    # A hash shuffle (the skip join's groupby and join) starts one aggregator actor, a fresh process, per CPU
    # and shuffle; on this 2-CPU session one holds all its partitions, so a hash-join night starts half as many.
    ray.data.DataContext.get_current().max_hash_shuffle_aggregators = 1
    yield ray
    ray.shutdown()


# Fixtures that start Ray or a server: a test using one (directly or through another fixture) is ``slow``, so
# ``make test-fast`` (``-m "not slow"``) never starts them, whatever a test file remembers to mark.
SLOW_FIXTURES = frozenset({"ray_local", "s3_server", "s3_bucket", "local_head"})


def pytest_collection_modifyitems(items):
    """Mark every test whose fixture closure starts Ray or a server as ``slow``."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker("slow")


_RELIABILITY_ROWS: list[tuple] = []


def pytest_runtest_logreport(report):
    """Collect the reliability table's rows from test reports (in the controller too, under pytest-xdist)."""
    if report.when == "teardown":
        _RELIABILITY_ROWS.extend(v for k, v in report.user_properties if k == "reliability_row")


def pytest_terminal_summary(terminalreporter):
    """Print the reliability table (fault, injected, rows expected/written/lost/duplicated) when its cases ran."""
    if _RELIABILITY_ROWS:
        from tests.test_reliability import table_lines

        terminalreporter.write_sep("-", "reliability: every input exactly once")
        for line in table_lines(_RELIABILITY_ROWS):
            terminalreporter.write_line(line)

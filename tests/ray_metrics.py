"""Test helper: read the local Ray's Prometheus endpoint and sum one run's series of the job's metrics."""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict

import ray
from prometheus_client.parser import text_string_to_metric_families

from jobs.score.metrics import RUN_ID


def scrape() -> str:
    """The metrics text of every live node's endpoint (Ray's dashboard agent, ``MetricsExportPort``)."""
    texts = []
    for node in ray.nodes():
        if node["Alive"]:
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            with urllib.request.urlopen(url, timeout=10) as reply:
                texts.append(reply.read().decode())
    return "\n".join(texts)


def run_series(run_id: str) -> dict[str, dict[tuple, float]]:
    """Series name -> {the labels other than Ray's own and run_id, as sorted pairs: value summed over workers}
    for the series tagged with ``run_id``."""
    ray_labels = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", RUN_ID}
    out: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(scrape()):
        for sample in family.samples:
            if sample.labels.get(RUN_ID) != run_id:
                continue
            key = tuple(sorted((k, v) for k, v in sample.labels.items()
                               if k not in ray_labels and not k.startswith("otel_")))
            out[sample.name][key] += sample.value
    return out


def wait_for(run_id: str, done, timeout_s: float = 60.0) -> dict[str, dict[tuple, float]]:
    """Poll :func:`run_series` until ``done(series)`` holds (workers flush every few seconds); the last
    series seen when it never does within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        series = run_series(run_id)
        if done(series) or time.monotonic() > deadline:
            return series
        time.sleep(0.5)

"""The scoring job's metrics: what a batch records, and the Grafana dashboard querying only names the module
defines (the scrape of a real run is in test_score_job)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from jobs.score import metrics
from schemas.output import OUTPUT_SCHEMA

DASHBOARD = Path(__file__).resolve().parents[1] / "cluster" / "grafana" / "clipn-score.json"


def _queries(node) -> list[str]:
    """Every PromQL text in the dashboard: panel targets' ``expr`` and the template variables' queries."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                out.append(value)
            else:
                out += _queries(value)
    elif isinstance(node, list):
        for value in node:
            out += _queries(value)
    return out


def test_the_dashboard_queries_only_metrics_the_module_defines_and_every_one_of_them():
    dashboard = json.loads(DASHBOARD.read_text())
    queries = _queries(dashboard)
    assert len(queries) >= len(metrics.METRICS)
    used = {name for q in queries for name in re.findall(r"\bray_[a-z0-9_]+", q)}
    assert used <= metrics.exported_names(), used - metrics.exported_names()
    for spec in metrics.METRICS:  # every metric has a panel
        assert any(name.startswith(metrics.RAY_PREFIX + spec.name) for name in used), spec.name
    # the run picker makes every panel's series one run's (or all, by regex)
    panel_exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert all('run_id=~"$run_id"' in e for e in panel_exprs)


def test_names_follow_prometheus_conventions():
    for spec in metrics.METRICS:
        assert spec.name.startswith("clipn_"), spec.name
        if spec.kind == "counter":
            assert spec.name.endswith("_total"), spec.name
        else:
            assert spec.name.endswith("_seconds") and list(spec.boundaries) == sorted(spec.boundaries)
        assert metrics.RUN_ID in spec.tag_keys and "uri" not in spec.tag_keys  # bounded per run, never per URI


class _Fake:
    """Stands for a Ray metric: sums what is recorded, per tag set."""

    def __init__(self):
        self.values = defaultdict(float)

    def inc(self, value, tags):
        assert value > 0  # Ray's Counter raises on 0
        self.values[tuple(sorted(tags.items()))] += value

    observe = inc


def test_a_batch_records_rows_by_status_flags_per_decision_column_and_latency(monkeypatch):
    fakes = defaultdict(_Fake)
    monkeypatch.setattr(metrics, "_instrument", lambda spec: fakes[spec.name])
    n = 5
    cols = {f.name: pa.nulls(n, f.type) for f in OUTPUT_SCHEMA}
    cols["status"] = pa.array(["ok", "ok", "truncated", "ok", "read_error"])
    cols["is_ood"] = pa.array([True, False, None, True, None])
    cols["ood_ctw"] = pa.array([False, False, None, True, None])
    cols["ood_atd"] = pa.array([False, False, None, False, None])  # none flagged: no series, no zero increment
    table = pa.table(cols, schema=OUTPUT_SCHEMA)
    run = metrics.RunMetrics("r1")
    run.rows(table)
    run.rows(table.slice(0, 2))
    run.batch_seconds(0.2)
    run.bytes_read(0)
    run.bytes_read(123)
    rid = ("run_id", "r1")
    assert dict(fakes["clipn_rows_total"].values) == {
        (rid, ("status", "ok")): 5, (rid, ("status", "truncated")): 1, (rid, ("status", "read_error")): 1}
    assert dict(fakes["clipn_rows_flagged_total"].values) == {
        (("decision", "is_ood"), rid): 3, (("decision", "ood_ctw"), rid): 1}
    assert dict(fakes["clipn_scorer_batch_seconds"].values) == {(rid,): 0.2}
    assert dict(fakes["clipn_read_bytes_total"].values) == {(rid,): 123}

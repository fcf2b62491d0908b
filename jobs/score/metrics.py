"""Metrics: the scoring job's Prometheus metrics, defined here once, recorded through Ray's metrics API.

Ray (:mod:`ray.util.metrics`) exports them on each node's metrics endpoint (the dashboard agent's
``metrics_export_port``, ``http://<node>:<port>/metrics``) under its namespace, so the Ray dashboard, and a
Prometheus that scrapes the cluster, see ``ray_`` + the names below (:func:`exported_names`). Each Ray worker
process flushes its values every ``RAY_metrics_report_interval_ms`` (10 s by default), labelled by Ray with
``WorkerId``, ``NodeAddress`` and ``SessionName``: sum over those.

Every metric is tagged with the ``run_id`` (one value per night: the series a night makes are bounded by the
statuses and decision columns, never by URIs), so a dashboard can pick one run and a test can find its own.

* ``clipn_rows_total{status}``: rows the scorer wrote, by status (``ok`` or an error kind), the manifest's
  ``by_status`` once the run is done. Images/s is not a metric of its own: it is
  ``rate(ray_clipn_rows_total[1m])`` (a counter + ``rate()``, so a scrape missed loses no images);
* ``clipn_rows_flagged_total{decision}``: rows flagged OOD, per decision column (``is_ood``, ``ood_ctw``, ...);
* ``clipn_scorer_batch_seconds``: wall time of one scorer call (device decode, forward, row building),
  a histogram; Ray reports its ``_sum`` from bucket midpoints, so read latency from the buckets (quantiles);
* ``clipn_read_bytes_total``: bytes of the image objects (tar: image members) read by the read tasks.

Counts are at least once: a task or actor call that Ray retries records again. The manifest holds the exact
counts; the metrics are for watching a run and its trend.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

RAY_PREFIX = "ray_"  # the namespace Ray's Prometheus exporter puts before every application metric
RUN_ID = "run_id"


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its Prometheus ``name`` (without Ray's prefix), ``kind`` (counter | histogram), help text,
    tag keys and, for a histogram, its bucket upper bounds (seconds)."""

    name: str
    kind: str
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


ROWS = MetricSpec("clipn_rows_total", "counter", "Rows written by the CLIPN scorer, by status (ok or an error kind)",
                  (RUN_ID, "status"))
FLAGGED = MetricSpec("clipn_rows_flagged_total", "counter",
                     "Rows flagged OOD by the CLIPN scorer, per decision column (is_ood, ood_ctw, ood_atd)",
                     (RUN_ID, "decision"))
BATCH_SECONDS = MetricSpec("clipn_scorer_batch_seconds", "histogram",
                           "Wall time of one CLIPN scorer call (device decode, forward, rows), seconds", (RUN_ID,),
                           (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))
BYTES_READ = MetricSpec("clipn_read_bytes_total", "counter",
                        "Bytes of image objects (tar: image members) read by the scoring job's read tasks", (RUN_ID,))
METRICS = (ROWS, FLAGGED, BATCH_SECONDS, BYTES_READ)


def exported_names() -> set[str]:
    """Every series name the metrics endpoint shows for :data:`METRICS` (Ray's prefix; a histogram's
    ``_bucket``, ``_sum`` and ``_count``)."""
    out: set[str] = set()
    for spec in METRICS:
        name = RAY_PREFIX + spec.name
        out |= {name + s for s in ("_bucket", "_sum", "_count")} if spec.kind == "histogram" else {name}
    return out


class _Unexported:
    """A metric recorded where Ray is not installed: kept nowhere."""

    def inc(self, value=1.0, tags=None) -> None:
        pass

    def observe(self, value, tags=None) -> None:
        pass


_lock = threading.Lock()
_made: dict[str, object] = {}


def _instrument(spec: MetricSpec):
    """This process's Ray metric for ``spec``, made once (scorer calls run in several threads at once)."""
    with _lock:
        metric = _made.get(spec.name)
        if metric is None:
            try:
                from ray.util import metrics  # only where something is recorded
            except ImportError:  # no Ray installed (the GPU check's one process): nowhere to export to
                metric = _made[spec.name] = _Unexported()
                return metric
            if spec.kind == "histogram":
                metric = metrics.Histogram(spec.name, spec.description, list(spec.boundaries), spec.tag_keys)
            else:
                metric = metrics.Counter(spec.name, spec.description, spec.tag_keys)
            _made[spec.name] = metric
        return metric


@dataclass(frozen=True)
class RunMetrics:
    """Records one run's metrics from the process it runs in (a read task, a scorer actor): picklable, the
    Ray metric objects are made in each process on first use."""

    run_id: str

    def rows(self, table: pa.Table) -> None:
        """Count a batch of output rows (:data:`~schemas.output.OUTPUT_SCHEMA`): by ``status``, and the rows
        each boolean decision column flags (null: not flagged)."""
        tags = {RUN_ID: self.run_id}
        rows = _instrument(ROWS)
        for value, n in Tally(table.column("status").to_pylist()).items():
            rows.inc(n, tags={**tags, "status": str(value)})
        flagged = _instrument(FLAGGED)
        for field in table.schema:
            if field.type == pa.bool_():
                n = pc.sum(table.column(field.name)).as_py() or 0
                if n:  # a Ray counter refuses an increment of 0
                    flagged.inc(n, tags={**tags, "decision": field.name})

    def batch_seconds(self, seconds: float) -> None:
        """Observe one scorer call's wall time (seconds)."""
        _instrument(BATCH_SECONDS).observe(seconds, tags={RUN_ID: self.run_id})

    def bytes_read(self, n: int) -> None:
        """Add ``n`` bytes read (a Ray counter refuses an increment of 0)."""
        if n > 0:
            _instrument(BYTES_READ).inc(n, tags={RUN_ID: self.run_id})

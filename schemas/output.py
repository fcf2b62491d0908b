"""The Arrow schema of the scoring job's Parquet output: the only definition of its columns.

Score columns come from the score registry (``clipn_core.scores.SCORES``): an ID score
``score_<name>`` (float32, higher = more ID) for every score, and ``ood_<name>`` (bool,
True = OOD) for the threshold-free ones (CTW, ATD). Every file is written with exactly
this schema, so a file holding only errors still has typed (null) columns.
"""

from __future__ import annotations

import pyarrow as pa

from clipn_core.scores import SCORES
from schemas.status import STATUS_OK, STATUS_READ_ERROR, STATUSES  # noqa: F401  (re-exported)

OUTPUT_SCHEMA_VERSION = 1


def score_column(name: str) -> str:
    return f"score_{name}"


def ood_column(name: str) -> str:
    return f"ood_{name}"


def _build() -> pa.Schema:
    fields = [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("byte_size", pa.int64()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("predicted_class", pa.string()),
        pa.field("predicted_index", pa.int32()),
        pa.field("predicted_prob", pa.float32()),
    ]
    fields += [pa.field(score_column(n), pa.float32()) for n in SCORES]
    fields += [pa.field(ood_column(n), pa.bool_()) for n, s in SCORES.items() if s.threshold_free]
    fields += [
        pa.field("is_ood", pa.bool_()),
        pa.field("embedding", pa.list_(pa.float16())),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("class_set_hash", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
    return pa.schema(fields, metadata={b"clipn_lake.schema_version": str(OUTPUT_SCHEMA_VERSION).encode()})


OUTPUT_SCHEMA: pa.Schema = _build()

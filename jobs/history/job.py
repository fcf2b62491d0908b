"""``clipn history``'s run: read the nights, check the latest, plot."""

from __future__ import annotations

from dataclasses import dataclass

from clipn_core.errors import InputError, redact_uri
from jobs.history.check import check
from jobs.history.plot import plot
from jobs.history.read import Night, iceberg_nights, parquet_nights
from schemas.history_config import HistoryJobConfig


@dataclass(frozen=True)
class History:
    """The nights by date, and the drift check's findings on the latest (None when the check did not run)."""

    nights: list[Night]
    findings: list[str] | None


def run(cfg: HistoryJobConfig) -> History:
    """Read the output's nights (computing the aggregates of nights whose manifest lacks them), run the drift
    check when ``cfg.check``, write the plot when ``cfg.plot``. Raises :class:`InputError` naming the output
    when it has no published night (a missing or mistyped folder or table)."""
    storage = cfg.storage.bind()
    nights = (parquet_nights(cfg.output, storage) if cfg.output is not None
              else iceberg_nights(cfg.iceberg, storage))
    if not nights:  # a mistyped output must not read as a night that passed its check
        where = f"output {redact_uri(cfg.output)}" if cfg.output is not None else f"iceberg.table {cfg.iceberg.table}"
        raise InputError(f"{where} has no published night")
    findings = check(nights, cfg.rule) if cfg.check else None
    if cfg.plot:
        plot(nights, cfg.plot, cfg.score, findings)
    return History(nights, findings)

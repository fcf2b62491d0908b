"""Check: does the latest night leave the band of the nights before it (the rule of :class:`schemas.drift.DriftRule`)?

Metrics, each a share in [0, 1]: ``ood_share`` (ok rows flagged OOD), ``class <name> ood_share`` (per predicted
class) and ``error_share`` (rows whose status is not ok; flagged only when it rises). A share counts on a night
only over at least ``min_rows`` rows (ok rows of the night or the class; all rows for the error share): a share of
a handful of rows is noise. Tonight's is checked against the trailing values, those of the up to ``nights``
nights before tonight where it counts:

* at least ``min_nights`` of them: flagged when ``|x - median| > max(z * 1.4826 * MAD, min_change)``, a robust
  z-score (1.4826 MAD estimates a normal spread, and neither the median nor the MAD moves much for one odd night
  in the window; ``min_change`` keeps a flat history, MAD 0, from flagging noise);
* fewer (but one or more): flagged when ``|x - median| > band``;
* none: nothing to compare with, nothing flagged.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from jobs.history.read import Night
from schemas.drift import DriftRule

MAD_TO_SIGMA = 1.4826  # MAD * this estimates the standard deviation of a normal distribution


def _finding(name: str, tonight: float, trailing: list[float], rule: DriftRule, rises_only: bool) -> str | None:
    if not trailing:
        return None
    median = statistics.median(trailing)
    change = tonight - median
    if rises_only and change <= 0:
        return None
    if len(trailing) >= rule.min_nights:
        mad = statistics.median(abs(v - median) for v in trailing)
        limit = max(rule.z * MAD_TO_SIGMA * mad, rule.min_change)
        z = change / (MAD_TO_SIGMA * mad) if mad > 0 else float("inf")
        why = f"robust z {z:+.1f} (MAD {mad:.4f}), limit {limit:.4f}"
    else:
        limit = rule.band
        why = f"absolute band {rule.band:.4f} ({len(trailing)} nights < {rule.min_nights})"
    if abs(change) <= limit:
        return None
    return (f"{name} {tonight:.4f} vs median {median:.4f} of the {len(trailing)} nights before: "
            f"{'up' if change > 0 else 'down'} {abs(change):.4f}, {why}")


def _trailing(nights: list[Night], metric: Callable[[Night], float | None], count: int) -> list[float]:
    values = [metric(n) for n in nights]
    return [v for v in values if v is not None][-count:]


def check(nights: list[Night], rule: DriftRule) -> list[str]:
    """Findings for the last of ``nights`` (by date) against the ``rule.nights`` before it that were scored by
    the same model and class set (nights whose model is unknown count), one line each, each starting with the
    night's date; [] when it stays in the band (or there is no night)."""
    if not nights:
        return []
    nights = sorted(nights, key=lambda n: n.run_date)
    tonight = nights[-1]
    # another model or class set moves every share: its nights are not tonight's trailing band
    before = [n for n in nights[:-1] if not (n.model and tonight.model) or n.model == tonight.model]
    enough = rule.min_rows

    def ood(n: Night) -> float | None:
        return n.aggregates.ood_share if n.aggregates.by_status.get("ok", 0) >= enough else None

    def errors(n: Night) -> float | None:
        return n.aggregates.error_share if n.aggregates.rows >= enough else None

    def of_class(name: str) -> Callable[[Night], float | None]:
        def share(n: Night) -> float | None:
            c = n.aggregates.by_class.get(name)
            return c.ood_share if c is not None and c.ok >= enough else None
        return share

    metrics: list[tuple[str, Callable[[Night], float | None], bool]] = [
        ("ood_share", ood, False), ("error_share", errors, True),
        *((f"class {name!r} ood_share", of_class(name), False) for name in sorted(tonight.aggregates.by_class))]
    found = []
    for name, metric, rises_only in metrics:
        value = metric(tonight)
        if value is None:
            continue
        line = _finding(name, value, _trailing(before, metric, rule.nights), rule, rises_only)
        if line is not None:
            found.append(f"{tonight.run_date.isoformat()}: {line}")
    return found

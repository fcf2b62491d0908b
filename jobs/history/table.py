"""Table: one line per night, as ``clipn history`` prints it."""

from __future__ import annotations

from jobs.history.read import Night


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _quantile(night: Night, score: str, level: float) -> str:
    a = night.aggregates
    values = a.quantiles.get(score)
    if not values or level not in a.quantile_levels or values[a.quantile_levels.index(level)] is None:
        return "-"
    return f"{values[a.quantile_levels.index(level)]:.4g}"


def format_table(nights: list[Night], score: str = "atd") -> str:
    """The nights (by date) as a fixed-width text table: rows, ok, the non-ok share, the OOD share, the class
    with the highest OOD share, ``score``'s 5/50/95 % quantiles, and where the aggregates come from."""
    head = (f"{'night':10} {'rows':>8} {'ok':>8} {'errors':>7} {'ood':>6}  {'top class (ood share)':26} "
            f"{score + ' p5':>9} {'p50':>9} {'p95':>9}  from")
    lines = [head]
    for n in sorted(nights, key=lambda n: n.run_date):
        a = n.aggregates
        top = max(a.by_class.items(), key=lambda kv: (kv[1].ood_share or 0, kv[0]), default=None)
        top_text = f"{top[0][:16]} ({_pct(top[1].ood_share)})" if top else "-"
        lines.append(f"{n.run_date.isoformat():10} {a.rows:8d} {a.by_status.get('ok', 0):8d} {_pct(a.error_share):>7} "
                     f"{_pct(a.ood_share):>6}  {top_text:26} {_quantile(n, score, 0.05):>9} "
                     f"{_quantile(n, score, 0.5):>9} {_quantile(n, score, 0.95):>9}  {a.computed_from}")
    return "\n".join(lines)

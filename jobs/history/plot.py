"""Plot: the nights as a PNG, three panels sharing the night axis: OOD and non-ok shares, each class's OOD
share, and a score's 5/25/50/75/95 % quantiles."""

from __future__ import annotations

from jobs.history.read import Night


def plot(nights: list[Night], path: str, score: str = "atd", findings: list[str] | None = None) -> None:
    """Write the PNG to the local ``path``; a night with findings is marked red on the first panel."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a batch machine
    import matplotlib.pyplot as plt

    nights = sorted(nights, key=lambda n: n.run_date)
    days = [n.run_date for n in nights]
    fig, (shares, classes, quantiles) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    pct = lambda v: None if v is None else 100 * v  # noqa: E731
    shares.plot(days, [pct(n.aggregates.ood_share) for n in nights], "o-", label="OOD share of ok rows")
    shares.plot(days, [pct(n.aggregates.error_share) for n in nights], "s--", label="non-ok share of rows")
    flagged = {f.split(":", 1)[0] for f in findings or []}
    for n in nights:
        if n.run_date.isoformat() in flagged:
            shares.axvline(n.run_date, color="red", alpha=0.3)
    shares.set_ylabel("%")
    shares.legend(loc="upper left")
    for name in sorted({c for n in nights for c in n.aggregates.by_class}):
        classes.plot(days, [pct(n.aggregates.by_class[name].ood_share) if name in n.aggregates.by_class else None
                            for n in nights], ".-", label=name[:20])
    classes.set_ylabel("OOD share per class, %")
    if classes.lines and len(classes.lines) <= 12:
        classes.legend(loc="upper left", fontsize="small")
    for level in (0.05, 0.25, 0.5, 0.75, 0.95):
        values = [n.aggregates.quantiles.get(score, [None] * len(n.aggregates.quantile_levels))
                  [n.aggregates.quantile_levels.index(level)] if level in n.aggregates.quantile_levels else None
                  for n in nights]
        quantiles.plot(days, values, "-" if level == 0.5 else ":", label=f"{level:.0%}")
    quantiles.set_ylabel(f"score_{score}")
    quantiles.legend(loc="upper left", fontsize="small")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

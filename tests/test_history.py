"""clipn history: nights read from manifests (or computed from rows), the table, the plot and the drift check.
No Ray: the manifests are built here."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipn_core.storage import Storage
from jobs.cli import main
from jobs.history import aggregates as agg
from jobs.history.check import check
from jobs.history.read import Night, parquet_nights
from schemas.drift import DriftRule
from schemas.manifest import ClassAggregate, NightAggregates, ScoreManifest

FIRST = dt.date(2026, 11, 1)
CLASSES = ("cat", "dog", "ship")


def _aggregates(ood: float, errors: float = 0.01, rows: int = 10_000, dog_ood: float | None = None) -> NightAggregates:
    bad = round(rows * errors)
    ok = rows - bad
    per = ok // len(CLASSES)
    by_class = {c: ClassAggregate(ok=per, ood=round(per * (dog_ood if c == "dog" and dog_ood is not None else ood)))
                for c in CLASSES}
    flagged = sum(c.ood for c in by_class.values())
    ok = per * len(CLASSES)
    return NightAggregates(rows=ok + bad, by_status={"ok": ok, "read_error": bad}, ood_share=flagged / ok,
                           by_class=by_class, quantiles={"atd": [0.1, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9]})


def _manifest(day: dt.date, aggregates: NightAggregates | None, rows: int, by_status: dict, files: list[str]):
    return ScoreManifest(schema_version=1, run_id=f"run-{day}", run_date=day, partition="p", model_id="m",
                         class_set_hash="h", classes=list(CLASSES), templates=["{}"], rows=rows, files=len(files),
                         data_files=files, by_status=by_status, ood_rate={"is_ood": None}, timings_s={}, config={},
                         aggregates=aggregates)


def _write_nights(root, shares: list[float], errors: list[float] | None = None, **last) -> None:
    """One published night per share (by date from FIRST), the last one with ``last`` passed to _aggregates."""
    errors = errors or [0.01] * len(shares)
    for i, (share, err) in enumerate(zip(shares, errors)):
        a = _aggregates(share, err, **(last if i == len(shares) - 1 else {}))
        day = FIRST + dt.timedelta(days=i)
        part = root / f"run_date={day}"
        part.mkdir(parents=True)
        (part / "_manifest.json").write_text(_manifest(day, a, a.rows, a.by_status, []).model_dump_json())
        (part / "_SUCCESS").write_text("")


# 14 trailing nights around 10% flagged, with night-to-night noise
TRAILING = [0.10, 0.11, 0.09, 0.10, 0.12, 0.10, 0.095, 0.105, 0.11, 0.09, 0.10, 0.115, 0.10, 0.098]


def test_a_night_at_5x_the_trailing_ood_share_is_flagged_and_plotted(tmp_path, capsys):
    median = float(np.median(TRAILING))
    _write_nights(tmp_path / "out", [*TRAILING, 5 * median])
    png = tmp_path / "history.png"
    assert main(["history", "--output", str(tmp_path / "out"), "--check", "--plot", str(png)]) == 1
    out = capsys.readouterr().out.splitlines()
    table = [line for line in out if line[:4] == "2026"]
    assert len(table) == 15 and table[-1].startswith("2026-11-15")
    findings = [line for line in out if line.startswith("drift: ")]
    # the overall share and every class's share left the band; the errors did not move
    assert any("2026-11-15: ood_share 0.5000 vs median 0.1000" in f for f in findings), findings
    assert sum("class '" in f for f in findings) == len(CLASSES)
    assert not any("error_share" in f for f in findings)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_normal_night_passes(tmp_path, capsys):
    _write_nights(tmp_path / "out", [*TRAILING, 0.112])
    assert main(["history", "--output", str(tmp_path / "out"), "--check"]) == 0
    assert "drift:" not in capsys.readouterr().out


def test_the_check_trails_only_nights_of_tonights_model_and_class_set():
    """A new model (or class list) moves every share: the nights of the old one are not its band."""
    old = [Night(FIRST + dt.timedelta(days=i), "", _aggregates(0.10), "m1/h") for i in range(14)]
    new = [Night(FIRST + dt.timedelta(days=14 + i), "", _aggregates(0.30), "m2/h") for i in range(3)]
    tonight = Night(FIRST + dt.timedelta(days=17), "", _aggregates(0.31), "m2/h")
    assert check([*old, *new, tonight], DriftRule()) == []
    # the same nights as one model's: tonight is 3x its trailing median
    assert check([*old, *new, Night(tonight.run_date, "", tonight.aggregates, "m1/h")], DriftRule())
    # a night whose model is unknown (an Iceberg night whose snapshot expired) still counts
    unknown = [Night(n.run_date, "", n.aggregates, "") for n in old]
    assert check([*unknown, tonight], DriftRule())


def test_history_of_an_output_with_no_night_is_an_error_naming_it(tmp_path, capsys):
    """A mistyped --output must not read as a night that passed its check."""
    assert main(["history", "--output", str(tmp_path / "typo"), "--check"]) == 1
    assert f"output {tmp_path / 'typo'} has no published night" in capsys.readouterr().err


def _subcommands() -> list[str]:
    from jobs.cli import make_parser

    parser = make_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_prints_its_help(command, capsys):
    """argparse %-formats help texts: a field description with a % sign crashed ``clipn history --help``."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_one_class_drifting_is_flagged_alone():
    nights = [Night(FIRST + dt.timedelta(days=i), "", _aggregates(s)) for i, s in enumerate(TRAILING)]
    tonight = Night(FIRST + dt.timedelta(days=14), "", _aggregates(0.10, dog_ood=0.40))
    findings = check([*nights, tonight], DriftRule())
    assert any(f.startswith("2026-11-15: class 'dog' ood_share") for f in findings), findings
    assert not any("'cat'" in f or "'ship'" in f for f in findings)


def test_a_jump_in_error_statuses_is_flagged_and_a_drop_is_not(tmp_path, capsys):
    errors = [0.010, 0.012, 0.009, 0.011, 0.010, 0.013, 0.010, 0.008, 0.011, 0.010, 0.012, 0.010, 0.009, 0.011]
    _write_nights(tmp_path / "up", [0.10] * 15, [*errors, 0.08])
    assert main(["history", "--output", str(tmp_path / "up"), "--check", "true"]) == 1
    findings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("drift: ")]
    assert len(findings) == 1 and "error_share" in findings[0] and "up" in findings[0]
    nights = [Night(FIRST + dt.timedelta(days=i), "", _aggregates(0.10, e)) for i, e in enumerate([0.10] * 14)]
    assert check([*nights, Night(FIRST + dt.timedelta(days=14), "", _aggregates(0.10, 0.0))], DriftRule()) == []


def test_few_nights_use_the_absolute_band():
    rule = DriftRule(band=0.10)
    nights = [Night(FIRST + dt.timedelta(days=i), "", _aggregates(0.10)) for i in range(3)]
    later = FIRST + dt.timedelta(days=3)
    assert check([*nights, Night(later, "", _aggregates(0.18))], rule) == []  # 8 points: inside the band
    flagged = check([*nights, Night(later, "", _aggregates(0.25))], rule)
    assert flagged and "absolute band" in flagged[0]
    assert check([Night(FIRST, "", _aggregates(0.9))], rule) == []  # a first night has nothing to compare with
    assert check([*nights, Night(later, "", _aggregates(0.9, rows=10))], rule) == []  # 9 ok rows: noise, not checked


def test_older_manifests_without_aggregates_are_computed_from_the_rows(tmp_path, capsys):
    from schemas.output import OUTPUT_SCHEMA

    rng = np.random.default_rng(0)
    n = 300
    status = ["ok"] * 280 + ["read_error"] * 15 + ["truncated"] * 5
    ok = np.array([s == "ok" for s in status])
    atd = np.where(ok, rng.random(n), np.nan).astype(np.float32)
    columns = {f.name: pa.nulls(n, f.type) for f in OUTPUT_SCHEMA}
    columns.update(uri=pa.array([f"s3://b/{i}.jpg" for i in range(n)]), status=pa.array(status),
                   predicted_class=pa.array([CLASSES[i % 3] if ok[i] else None for i in range(n)]),
                   is_ood=pa.array([bool(ok[i] and atd[i] < 0.2) if ok[i] else None for i in range(n)]),
                   score_atd=pa.array(atd, pa.float32(), mask=~ok), model_id=pa.array(["m"] * n),
                   class_set_hash=pa.array(["h"] * n), run_id=pa.array(["r"] * n),
                   scored_at=pa.array([dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)] * n, OUTPUT_SCHEMA.field("scored_at").type))
    table = pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)
    part = tmp_path / "out" / f"run_date={FIRST}"
    part.mkdir(parents=True)
    # two files, so the night's aggregates merge partials
    pq.write_table(table.slice(0, 170), part / "part-a.parquet")
    pq.write_table(table.slice(170), part / "part-b.parquet")
    pq.write_table(table.slice(0, 50), part / "part-stale.parquet")  # not named by the manifest: not the night's
    old = _manifest(FIRST, None, n, {"ok": 280, "read_error": 15, "truncated": 5}, ["part-a.parquet", "part-b.parquet"])
    raw = json.loads(old.model_dump_json())
    del raw["aggregates"], raw["alerts"]  # as written before the fields existed
    (part / "_manifest.json").write_text(json.dumps(raw))
    (part / "_SUCCESS").write_text("")

    [night] = parquet_nights(str(tmp_path / "out"), Storage({}))
    a = night.aggregates
    assert a.computed_from == "rows" and a.rows == n and a.by_status == {"ok": 280, "read_error": 15, "truncated": 5}
    flagged = (atd[ok] < 0.2)
    assert a.ood_share == pytest.approx(flagged.mean())
    for i, c in enumerate(CLASSES):
        mine = np.array([j % 3 == i for j in range(n)])[ok]
        assert a.by_class[c] == ClassAggregate(ok=int(mine.sum()), ood=int(flagged[mine].sum()))
    # exact below SUMMARY_POINTS scores: the inverse empirical CDF of the ok rows' scores
    expected = np.quantile(atd[ok].astype(np.float64), a.quantile_levels, method="inverted_cdf")
    assert a.quantiles["atd"] == pytest.approx(expected.tolist())
    assert a.quantiles["mcm"] == [None] * len(a.quantile_levels)  # a score no row has
    assert main(["history", "--output", str(tmp_path / "out")]) == 0
    assert "rows" in capsys.readouterr().out.splitlines()[-1]


def test_quantiles_past_the_summary_size_stay_within_its_rank_error():
    rng = np.random.default_rng(1)
    values = rng.standard_normal(25_000).astype(np.float32)
    parts = [agg.partial(pa.table({"status": ["ok"] * len(chunk), "predicted_class": ["a"] * len(chunk),
                                   "is_ood": [False] * len(chunk), "score_x": chunk}))
             for chunk in np.array_split(values, 7)]
    a = agg.merge(parts)
    assert all(len(p["scores"]["x"]["v"]) <= agg.SUMMARY_POINTS for p in parts)
    ranks = np.searchsorted(np.sort(values), a.quantiles["x"]) / len(values)
    assert np.all(np.abs(ranks - np.array(a.quantile_levels)) <= 1 / agg.SUMMARY_POINTS)


def test_iceberg_properties_keep_the_latest_nights_aggregates():
    from jobs.score.iceberg import AGGREGATE_NIGHTS_KEPT, AGGREGATES_PROP, night_properties

    class Table:  # night_properties reads only the table's properties
        properties = {f"{AGGREGATES_PROP}{FIRST + dt.timedelta(days=i)}": "{}" for i in range(AGGREGATE_NIGHTS_KEPT)}

    day = FIRST + dt.timedelta(days=AGGREGATE_NIGHTS_KEPT)
    a = _aggregates(0.1)
    keep, drop = night_properties(Table(), _manifest(day, a, a.rows, a.by_status, []))
    record = json.loads(keep[f"{AGGREGATES_PROP}{day}"])
    assert record["run_id"] == f"run-{day}" and NightAggregates.model_validate(record["aggregates"]) == a
    assert drop == [f"{AGGREGATES_PROP}{FIRST}"]  # the oldest goes, so the table keeps AGGREGATE_NIGHTS_KEPT


def test_a_table_created_but_never_committed_to_has_no_nights(tmp_path):
    """A run's alerts: check reads the table's nights before its first commit (the run created the table)."""
    from jobs.history.read import iceberg_nights
    from jobs.score.iceberg import load_table
    from schemas.score_config import IcebergConfig

    cfg = IcebergConfig(table="lake.flags", uri=f"sqlite:///{tmp_path / 'catalog.db'}", warehouse=f"file://{tmp_path}/wh")
    load_table(cfg, Storage({}), create=True)
    assert iceberg_nights(cfg, Storage({})) == []


def test_ray_blocks_give_the_aggregates_of_the_driver_pass(ray_local, tmp_path):
    """A night past DRIVER_ROWS_MAX rows is aggregated by Ray Data, one partial per block: the same aggregates as
    the driver's pass over the same files (exact here: the night holds fewer than SUMMARY_POINTS scores, so no
    block Ray makes of it holds more)."""
    import pyarrow.fs as pafs

    rng = np.random.default_rng(2)
    n = 800
    ok = rng.random(n) > 0.1
    table = pa.table({"uri": [f"u{i}" for i in range(n)], "status": np.where(ok, "ok", "read_error"),
                      "predicted_class": pa.array([CLASSES[i % 3] for i in range(n)], mask=~ok),
                      "is_ood": pa.array(rng.random(n) < 0.2, mask=~ok),
                      "score_atd": pa.array(rng.random(n).astype(np.float32), mask=~ok)})
    staged = tmp_path / "run_date=2026-11-01"  # as an Iceberg run stages: the hive-looking folder adds no column
    staged.mkdir()
    for i in range(4):
        pq.write_table(table.slice(i * 200, 200), staged / f"part-{i}.parquet")
    files = sorted(str(p) for p in staged.glob("*.parquet"))
    arrow = agg.from_files(files, pafs.LocalFileSystem(), computed_from="job")
    ray_made = agg.from_staged(str(staged), Storage({}), rows=n, driver_rows_max=n - 1)
    assert ray_made == arrow and arrow.rows == n and arrow.by_status["ok"] == int(ok.sum())

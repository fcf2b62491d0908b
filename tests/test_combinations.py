"""The combination matrix: every pair of the options users combine, two nights each.

Options: target (Parquet folder, Iceberg table) x input (prefix, manifest, tar shards) x ``skip_scored`` x
``since: last_run`` (prefix inputs only) x lake bank x calibrated threshold. The rows are an all-pairs covering
set made by a small deterministic greedy (:func:`all_pairs`), not the full product; ``test_the_matrix_covers_
every_pair`` checks the cover. Each row runs two nights on a lake in the session's S3 server: night 2 adds
objects (and, for ``since``, overwrites one), and every night is checked for one row per input, no duplicate
URI, its counts (rows + skipped = listed, for every input kind) and what the README says night 2 does.
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import clipn_core as cc
from clipn_core.negatives import load_lexicon
from clipn_core.storage import Storage
from jobs.cli import main as cli_main
from jobs.demo import world
from jobs.score import run
from jobs.score.iceberg import RUN_DATE, load_table
from jobs.score.iceberg import night as midnight
from schemas.manifest import ScoreManifest
from schemas.score_config import IcebergConfig, ScoreJobConfig

pytestmark = pytest.mark.slow
DAY = dt.date(2026, 12, 1)
NIGHT_2 = DAY + dt.timedelta(days=1)
CLASSES = ["circle", "square", "triangle"]
CAL_SCORE, CAL_TARGET = "atd", 0.99
# 21 ok images on night 1: the lake bank needs 20 ok rows (2 / its decile) to be built from the rows at all
OLD_OK, NEW = 21, 3
BROKEN = "broken.jpg"
LEXICON_WORDS, NEGATIVES = 1000, 100

FACTORS: dict[str, tuple] = {
    "target": ("parquet", "iceberg"),
    "input": ("prefix", "manifest", "tar"),
    "skip_scored": (False, True),
    "since": (None, "last_run"),
    "lake_bank": (False, True),
    "calibrated": (False, True),
}


def allowed(combo: dict) -> bool:
    """What a config accepts: ``input.since`` needs a listing, so only prefix inputs take it."""
    return combo["since"] is None or combo["input"] == "prefix"


def _pairs(combo: dict) -> frozenset[tuple]:
    return frozenset(((a, combo[a]), (b, combo[b])) for a, b in itertools.combinations(combo, 2))


def all_pairs(factors: dict[str, tuple], allowed) -> list[dict]:
    """A covering set of ``factors``: every pair of values that some allowed combination holds is in one of the
    returned combinations. Greedy, started once from each allowed combination: after the first, repeatedly take
    the combination covering the most pairs not covered yet (the first in product order on ties); the shortest
    cover wins (the first on ties), so the set is the same every run."""
    candidates = [dict(zip(factors, values)) for values in itertools.product(*factors.values())]
    candidates = [c for c in candidates if allowed(c)]
    pairs = [_pairs(c) for c in candidates]
    needed = frozenset().union(*pairs)
    best: list[int] | None = None
    for start in range(len(candidates)):
        chosen, uncovered = [start], needed - pairs[start]
        while uncovered:
            pick = max(range(len(candidates)), key=lambda i: len(pairs[i] & uncovered))
            chosen.append(pick)
            uncovered -= pairs[pick]
        if best is None or len(chosen) < len(best):
            best = chosen
    return [candidates[i] for i in best]


MATRIX = all_pairs(FACTORS, allowed)


def _row_id(combo: dict) -> str:
    flags = [name for name in ("skip_scored", "lake_bank", "calibrated") if combo[name]]
    since = ["since"] if combo["since"] else []
    return "-".join([combo["target"], combo["input"], *since, *flags]) or "plain"


def test_the_matrix_covers_every_pair():
    """Every pair of option values that a valid config can hold is in some row, and no row is refused."""
    valid = [dict(zip(FACTORS, v)) for v in itertools.product(*FACTORS.values())]
    valid = [c for c in valid if allowed(c)]
    needed = set().union(*map(_pairs, valid))
    covered = set().union(*map(_pairs, MATRIX))
    assert needed <= covered, sorted(needed - covered)
    assert all(allowed(c) for c in MATRIX)
    assert ((("input", "tar"), ("since", "last_run"))) not in needed  # refused by the config, so never a row
    # the fewest rows any cover has: prefix needs three (since off; since on with both targets), manifest and
    # tar two each (skip_scored off and on)
    assert len(MATRIX) == 7
    assert all_pairs(FACTORS, allowed) == MATRIX  # deterministic


# --- the lake -----------------------------------------------------------------------------------------------

def _image(i: int, colour: str) -> bytes:
    return world.encode(world.render(world.SHAPES[i % 8], colour, i, 40))


OLD = {f"img{i:02d}.jpg": _image(i, "blue") for i in range(OLD_OK)}
OLD[BROKEN] = _image(99, "red")[:300]  # cut short: a permanent failure, which skip_scored does not score again
FRESH = {f"new{i}.jpg": _image(50 + i, "green") for i in range(NEW)}
UPDATED = "img00.jpg"  # since rows: overwritten on night 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny checkpoint, a negatives cache shared by every run, and a calibration made with ``clipn calibrate``
    on separate ID images (threshold of CAL_SCORE keeping CAL_TARGET): the same setup as the nights'."""
    root = tmp_path_factory.mktemp("matrix")
    net, spec = cc.build_clipn("clipn-tiny", seed=1)
    ckpt = str(root / "m.safetensors")
    cc.save_checkpoint(net, spec, ckpt)
    sample = root / "id-sample"
    sample.mkdir()
    for i in range(40):
        (sample / f"id{i:02d}.jpg").write_bytes(world.encode(world.render(CLASSES[i % 3], "blue", 200 + i, 40)))
    # a short lexicon: mining the shipped one (46,923 words) costs about a minute here, and every option in the
    # matrix scores with whatever negatives it is given
    lexicon = root / "lexicon.txt"
    lexicon.write_text("\n".join(load_lexicon()[:LEXICON_WORDS]) + "\n")
    negatives = {"lexicon": str(lexicon), "count": NEGATIVES}
    cache, cal_dir = str(root / "cache"), root / "cal"
    code = cli_main(["calibrate", "--data.kind", "prefix", "--data.uri", str(sample), "--model.checkpoint", ckpt,
                     "--classes.names", json.dumps(CLASSES), "--output.dir", str(cal_dir), "--bootstrap", "20",
                     "--runtime.cache_dir", cache, "--decision_score", CAL_SCORE,
                     "--decision_target", str(CAL_TARGET), "--negatives.lexicon", str(lexicon),
                     "--negatives.count", str(NEGATIVES)])
    assert code == 0
    cal = json.loads((cal_dir / "calibration.json").read_text())
    threshold = next(t["threshold"] for t in cal["thresholds"][CAL_SCORE] if t["target"] == CAL_TARGET)
    return {"ckpt": ckpt, "cache": cache, "negatives": negatives, "calibration": str(cal_dir / "calibration.json"),
            "cal_id": cal["id"], "threshold": threshold}


@dataclass
class Lake:
    """One row's lake in its own bucket, in the layout of its input kind; what each night's input names."""

    kind: str
    bucket: str
    fs: object
    inputs: dict[dt.date, list[str]] = field(default_factory=dict)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, night: dt.date, images: dict[str, bytes], keep: list[str]) -> None:
        """Write ``images`` as this night's new objects; the night's input names them and ``keep``."""
        if self.kind == "tar":  # one new shard a night
            shard = f"shards/{len(self.inputs):05d}.tar"
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for name, data in images.items():  # WebDataset: key.jpg beside key.json
                    for member, payload in ((name, data), (name.replace(".jpg", ".json"), b'{"k": 1}')):
                        info = tarfile.TarInfo(member)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
            self.fs.pipe_file(f"{self.bucket}/{shard}", buf.getvalue())
            self.inputs[night] = keep + [f"{self.url(shard)}#{name}" for name in images]
            return
        for name, data in images.items():
            self.fs.pipe_file(f"{self.bucket}/lake/{name}", data)
        self.inputs[night] = keep + [self.url(f"lake/{name}") for name in images]
        if self.kind == "manifest":  # a night's manifest names every object the night must have a row for
            buf = io.BytesIO()
            pq.write_table(pa.table({"uri": self.inputs[night]}), buf)
            self.fs.pipe_file(f"{self.bucket}/manifests/{night}.parquet", buf.getvalue())

    def input_cfg(self, night: dt.date, since: str | None) -> dict:
        if self.kind == "prefix":
            # margin 0: the test separates the nights by more than the store's one-second LastModified
            return {"kind": "prefix", "uri": self.url("lake/"), "since": since, "since_margin_s": 0}
        if self.kind == "manifest":
            return {"kind": "manifest", "uri": self.url(f"manifests/{night}.parquet")}
        return {"kind": "tar", "uri": self.url("shards/")}


def _config(combo: dict, lake: Lake, night: dt.date, tmp_path, model: dict, endpoint: str) -> ScoreJobConfig:
    if combo["target"] == "parquet":
        target = {"uri": str(tmp_path / "out")}
    else:
        target = {"iceberg": _iceberg(tmp_path)}
    decision = {"rule": "atd"}
    if combo["calibrated"]:
        decision = {"rule": "threshold", "score": CAL_SCORE, "threshold": model["threshold"],
                    "calibration": model["calibration"]}
    return ScoreJobConfig.model_validate({
        "input": lake.input_cfg(night, combo["since"]),
        "output": {**target, "run_date": str(night), "skip_scored": combo["skip_scored"],
                   "embeddings": combo["lake_bank"], "lake_bank": combo["lake_bank"]},
        "model": {"checkpoint": model["ckpt"]}, "classes": {"names": CLASSES}, "decision": decision,
        "negatives": model["negatives"],
        # the bank's evidence rate: the calibrated decision's own when there is one, else ATD's rule's
        "lake_bank": {"calibration": model["calibration"] if combo["lake_bank"] else None},
        "storage": {"endpoint_url": endpoint},
        "runtime": {"batch_size": 32, "decode_batch_size": 32, "cache_dir": model["cache"]}})


def _iceberg(tmp_path) -> dict:
    return {"table": "lake.ood_flags", "uri": f"sqlite:///{tmp_path / 'catalog.db'}",
            "warehouse": f"file://{tmp_path / 'wh'}"}


def _night_rows(combo: dict, manifest: ScoreManifest, tmp_path, night: dt.date) -> list[dict]:
    """The rows the night published, as a reader of that night sees them (the files its manifest names; the
    table's rows of that night)."""
    columns = ["uri", "status", "score_atd", "is_ood"]
    if combo["target"] == "parquet":
        files = [f"{manifest.partition}/{f}" for f in manifest.data_files or []]
        return pads.dataset(files, format="parquet").to_table(columns=columns).to_pylist() if files else []
    table = load_table(IcebergConfig(**_iceberg(tmp_path)), Storage({}), create=False)
    rows = table.scan(selected_fields=(*columns, RUN_DATE)).to_arrow().to_pylist()
    return [r for r in rows if r[RUN_DATE] == midnight(night)]


@dataclass(frozen=True)
class Expected:
    """What a night must publish: a row for each of ``rows`` and nothing else, and the manifest's counts."""

    rows: frozenset[str]
    listed: int
    skipped: int = 0
    excluded: int = 0


def expected_second_night(combo: dict, lake: Lake) -> Expected:
    """Night 2 as the README describes it. ``since: last_run`` lists only what was modified after night 1's
    listing began (the new objects and the overwritten one) and scores them all: night 1 holds the overwritten
    object's URI, but an older version of it; ``skip_scored`` leaves out what earlier nights scored ok or
    failed on for good (the cut-short object is ``truncated``, a permanent failure, and unchanged: not scored
    again; the overwritten object is, with ``since``, through the listing); otherwise every input gets its row
    again."""
    everything = lake.inputs[NIGHT_2]
    new = frozenset(everything) - frozenset(lake.inputs[DAY])
    if combo["since"]:
        listed = new | {lake.url(f"lake/{UPDATED}")}
        rows = new if combo["skip_scored"] else listed
        return Expected(rows, len(listed), skipped=len(listed - rows), excluded=len(everything) - len(listed))
    if combo["skip_scored"]:
        return Expected(new, len(everything), skipped=len(everything) - len(new))
    return Expected(frozenset(everything), len(everything))


def check_night(label: str, combo: dict, manifest: ScoreManifest, rows: list[dict], want: Expected, model: dict,
                bank_before: str | None) -> list[str]:
    """Every way the night differs from ``want`` and from what its options promise, one line each."""
    problems = []
    uris = [r["uri"] for r in rows]
    duplicated = sorted(u for u, n in Counter(uris).items() if n > 1)
    if duplicated:
        problems.append(f"{label}: {len(duplicated)} URIs with more than one row: {duplicated[:3]}")
    missing, extra = sorted(want.rows - set(uris)), sorted(set(uris) - want.rows)
    if missing or extra:
        problems.append(f"{label}: {len(rows)} rows, want {len(want.rows)}; no row for {len(missing)} "
                        f"{missing[:3]}; {len(extra)} rows not wanted {extra[:3]}")
    if manifest.rows != len(rows):
        problems.append(f"{label}: manifest.rows {manifest.rows} but {len(rows)} rows published")
    counts = (manifest.inputs_listed, manifest.skipped_already_scored, manifest.excluded_by_watermark)
    if counts != (want.listed, want.skipped, want.excluded):
        problems.append(f"{label}: (inputs_listed, skipped_already_scored, excluded_by_watermark) = {counts}, "
                        f"want {(want.listed, want.skipped, want.excluded)}")
    if combo["calibrated"]:
        if manifest.calibration_id != model["cal_id"]:
            problems.append(f"{label}: calibration_id {manifest.calibration_id}, want {model['cal_id']}")
        wrong = [r["uri"] for r in rows if r["status"] == "ok" and r["is_ood"] != (r["score_atd"] < model["threshold"])]
        if wrong:
            problems.append(f"{label}: is_ood is not {CAL_SCORE} < the calibrated threshold for {wrong[:3]}")
    if combo["lake_bank"]:
        if manifest.lake_bank_built is None:
            problems.append(f"{label}: no lake bank built")
        # the previous night's bank is found and named; it has an identity (changes the scores) only when it has
        # proxies: this untrained model's ATD flags every image, so its nights build empty banks (meta says why)
        if manifest.lake_bank_built is not None and manifest.lake_bank_meta.get("empty") is None:
            problems.append(f"{label}: the untrained model's night built a non-empty bank {manifest.lake_bank_meta}")
        if (manifest.lake_bank_used, manifest.lake_bank_id) != (bank_before, None):
            problems.append(f"{label}: used lake bank {manifest.lake_bank_used} ({manifest.lake_bank_id}), want "
                            f"{bank_before} (the previous night's), empty")
    elif (manifest.lake_bank_built, manifest.lake_bank_used) != (None, None):
        problems.append(f"{label}: a lake bank without output.lake_bank")
    return problems


@pytest.mark.parametrize("combo", MATRIX, ids=[_row_id(c) for c in MATRIX])
def test_two_nights_of_every_pair_of_options(combo, model, s3_bucket, ray_local, tmp_path):
    bucket, opts = s3_bucket
    endpoint = opts["client_kwargs"]["endpoint_url"]
    lake = Lake(combo["input"], bucket, Storage(opts).fs(f"s3://{bucket}")[0])
    lake.put(DAY, OLD, keep=[])
    if combo["since"]:
        # S3 keeps LastModified to the second and the margin is 0: night 1's listing begins a second after
        # its objects were written, so that night 2 tells them apart from what came after
        time.sleep(1.1)
    first = run(_config(combo, lake, DAY, tmp_path, model, endpoint))
    problems = check_night("night 1", combo, first, _night_rows(combo, first, tmp_path, DAY),
                           Expected(frozenset(lake.inputs[DAY]), len(lake.inputs[DAY])), model, None)

    lake.put(NIGHT_2, FRESH, keep=lake.inputs[DAY])
    if combo["since"]:
        lake.fs.pipe_file(f"{bucket}/lake/{UPDATED}", _image(7, "pink"))
    try:
        second = run(_config(combo, lake, NIGHT_2, tmp_path, model, endpoint))
    except Exception as e:  # reported with night 1's findings; the traceback is chained
        pytest.fail("\n".join([*problems, f"night 2 raised {type(e).__name__}: {e}"]))
    problems += check_night("night 2", combo, second, _night_rows(combo, second, tmp_path, NIGHT_2),
                            expected_second_night(combo, lake), model, first.lake_bank_built)
    assert not problems, "\n".join(problems)

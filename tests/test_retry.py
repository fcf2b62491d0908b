"""Retry what failed, and only that: a transient failure heals on the next night, a permanent one is not scored
again unless its object changed, and retries stop after output.retry_nights nights."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from jobs.demo import world
from jobs.score import run
from jobs.score.retry import (
    KIND_OK,
    KIND_OVERLAP,
    KIND_PERMANENT,
    KIND_TRANSIENT,
    RetryRules,
    verdict,
)
from schemas.score_config import ScoreJobConfig

DAY = dt.date(2026, 11, 10)
INF = float("inf")


def _image(i: int) -> bytes:
    return world.encode(world.render(world.SHAPES[i % 8], "green", i, 40))


def _backdate(path: Path, seconds: float = 2 * 3600) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def _statuses(partition: str) -> dict[str, str]:
    table = pads.dataset(partition, format="parquet").to_table(columns=["uri", "status"])
    return {Path(u).name: s for u, s in zip(table.column("uri").to_pylist(), table.column("status").to_pylist())}


@pytest.mark.parametrize("mode, broadcast_max_rows", [("skip_scored", 200_000), ("since", 0)],
                         ids=["skip_scored, broadcast", "since, hash join"])
def test_a_transient_failure_heals_the_next_night_and_a_permanent_one_is_not_scored_again(tmp_path, ckpt, ray_local,
                                                                                          mode, broadcast_max_rows):
    """Night 1: two dangling links (read_error: the object is not there yet), two broken images (not_an_image).
    Before night 2 one link's object appears (older than the since watermark: only a retry reads it again), the
    other link is touched (since lists it again: listed and added back, it is scored once) and one broken image is
    rewritten: night 2 scores the two links again (one heals) and the rewritten image, not the unchanged broken
    one. Night 3 (retry_nights 1) gives the still-dangling link up."""
    lake, out, elsewhere = tmp_path / "lake", tmp_path / "out", tmp_path / "elsewhere"
    lake.mkdir()
    elsewhere.mkdir()
    for i, name in enumerate(["a0.jpg", "a1.jpg"]):
        (lake / name).write_bytes(_image(i))
    for name in ("bad.jpg", "fixed.jpg"):
        (lake / name).write_bytes(b"broken")
    for name in ("gone1.jpg", "gone2.jpg"):
        (lake / name).symlink_to(elsewhere / name)
    for path in lake.iterdir():
        _backdate(path)  # older than the since margin: only a retry lists them again

    def night(n: int):
        data = {"input": {"uri": str(lake)}, "output": {"uri": str(out), "run_date": str(DAY + dt.timedelta(days=n)),
                                                        "retry_nights": 1},
                "model": {"checkpoint": ckpt}, "classes": {"names": ["circle", "square", "triangle"]},
                "negatives": {"enabled": False},
                "runtime": {"batch_size": 8, "decode_batch_size": 8, "skip_broadcast_max_rows": broadcast_max_rows}}
        if mode == "skip_scored":
            data["output"]["skip_scored"] = True
        else:
            data["input"]["since"] = "last_run"
        return run(ScoreJobConfig.model_validate(data))

    first = night(0)
    assert _statuses(first.partition) == {"a0.jpg": "ok", "a1.jpg": "ok", "bad.jpg": "not_an_image",
                                          "fixed.jpg": "not_an_image", "gone1.jpg": "read_error",
                                          "gone2.jpg": "read_error"}
    assert (first.retried, first.healed, first.retry_added) == (0, 0, 0)

    (elsewhere / "gone1.jpg").write_bytes(_image(5))
    _backdate(elsewhere / "gone1.jpg")  # the link's object: what the listing sees through it
    (lake / "fixed.jpg").write_bytes(_image(6))  # rewritten after night 1's listing began: a changed object
    os.utime(lake / "gone2.jpg", follow_symlinks=False)  # the dangling link itself, touched: listed by since again
    second = night(1)
    assert _statuses(second.partition) == {"fixed.jpg": "ok", "gone1.jpg": "ok", "gone2.jpg": "read_error"}
    assert (second.retried, second.healed, second.rows) == (2, 1, 3)
    if mode == "skip_scored":  # everything listed; ok and unchanged permanent failures skipped
        assert (second.inputs_listed, second.skipped_already_scored, second.retry_added) == (6, 3, 0)
    else:  # the rewritten image and the touched link are listed; the other link is added back below the watermark
        assert (second.inputs_listed, second.excluded_by_watermark, second.retry_added) == (2, 4, 1)
    assert second.rows + second.skipped_already_scored == second.inputs_listed + second.retry_added

    third = night(2)  # gone2 failed on 2 nights: retried on retry_nights = 1 already, given up
    assert (third.rows, third.retried, third.healed, third.retry_added) == (0, 0, 0, 0)


def test_the_verdict_of_a_uri_from_its_rows():
    """(night, watermark, kind) rows -> (skip_until, retry): retries counted from the last settled row, bounded by
    retry_nights; a failure given up or permanent is skipped until its object changes (or for good when the inputs
    carry no modification time); an ok row skips for good; an overlap night skips until its watermark."""
    rules = RetryRules(retry_nights=2, skip_done=True, changes_visible=True)
    assert verdict([(1, 10.0, KIND_TRANSIENT)], rules) == (None, True)
    assert verdict([(1, 10.0, KIND_TRANSIENT), (2, 20.0, KIND_TRANSIENT)], rules) == (None, True)
    assert verdict([(1, 10.0, KIND_TRANSIENT), (2, 20.0, KIND_TRANSIENT), (3, 30.0, KIND_TRANSIENT)], rules) == (30.0, False)
    assert verdict([(1, 10.0, KIND_PERMANENT), (2, 20.0, KIND_TRANSIENT), (3, 30.0, KIND_PERMANENT),
                    (4, 40.0, KIND_TRANSIENT)], rules) == (None, True)  # one failure since the last settled row
    assert verdict([(1, 10.0, KIND_PERMANENT)], rules) == (10.0, False)
    assert verdict([(1, 10.0, KIND_PERMANENT)], RetryRules(2, True, changes_visible=False)) == (INF, False)
    assert verdict([(1, 10.0, KIND_OK), (2, 20.0, KIND_PERMANENT)], rules) == (INF, False)
    assert verdict([(1, 10.0, KIND_TRANSIENT)], RetryRules(retry_nights=0)) == (10.0, False)
    # since alone: earlier rows only retry; an overlap night skips what it holds unchanged, a retry wins over it
    since = RetryRules(retry_nights=2, skip_done=False)
    assert verdict([(1, 10.0, KIND_OK), (0, 15.0, KIND_OVERLAP)], since) == (15.0, False)
    assert verdict([(1, 10.0, KIND_PERMANENT)], since) == (None, False)
    assert verdict([(1, 10.0, KIND_TRANSIENT), (0, 15.0, KIND_OVERLAP)], since) == (None, True)

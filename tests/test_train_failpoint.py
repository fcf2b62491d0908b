"""The training loop's failpoint fires at a defined state: after Ray Train registered what the worker reported."""

from __future__ import annotations

import pytest
import ray.train

from jobs import failpoints
from jobs.train import loop


def test_a_firing_failpoint_settles_before_it_acts_and_a_silent_one_never_waits(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv(failpoints.ENV, "train.step=raise,step=3,rank=0")

    def settle():
        calls.append("settled")

    failpoints.hit("train.step", settle=settle, step=2, rank=0)  # not this step: no wait, no fault
    assert calls == []
    with pytest.raises(failpoints.FailpointError):
        try:
            failpoints.hit("train.step", settle=settle, step=3, rank=0)
        finally:
            assert calls == ["settled"]  # before the action
    monkeypatch.delenv(failpoints.ENV)
    failpoints.hit("train.step", settle=settle, step=3, rank=0)
    assert calls == ["settled"]


def test_the_loop_settles_on_every_report_of_the_worker_being_processed(monkeypatch):
    asked = []
    monkeypatch.setattr(ray.train, "get_all_reported_checkpoints", lambda **kw: asked.append(kw) or [])
    loop._reports_processed()
    # COMMITTED: every in-flight report processed (checkpoints registered), without waiting for validations
    assert asked == [{"consistency_mode": ray.train.CheckpointConsistencyMode.COMMITTED}]

"""The training job's placement group cleaner: a run's workers are removed only when its controller is known
dead, never on an empty State API answer (Ray 2.60's cleaner removes them then; seen under load)."""

from __future__ import annotations

import types

import pytest
from ray.train import ScalingConfig
from ray.train.v2._internal.callbacks import placement_group_callback
from ray.train.v2._internal.execution.controller import placement_group_cleaner
from ray.train.v2._internal.state import util as state_util

from jobs.train import trainer


def _monitor(cleaner_cls, monkeypatch, answers: list[str | None]) -> tuple[list, int]:
    """Run a cleaner's monitor loop for one registered placement group while the State API gives ``answers``
    (an actor state, or None: no record) for the controller; returns (the placement groups it removed, how many
    answers it asked for)."""
    removed, pg = [], types.SimpleNamespace(id="pg-live")
    states = iter(answers)

    def get_actor(actor_id, timeout):
        assert actor_id == "controller"
        state = next(states, "DEAD")  # a controller that does die in the end, so every loop stops
        return None if state is None else types.SimpleNamespace(state=state)

    monkeypatch.setattr(state_util, "get_actor", get_actor)  # what Ray's is_actor_alive asks
    monkeypatch.setattr(trainer, "get_actor", get_actor)
    monkeypatch.setattr(placement_group_cleaner, "remove_placement_group", removed.append)
    # the liveness rule our cleaner installs in its own process: restored after the test
    monkeypatch.setattr(placement_group_cleaner, "is_actor_alive", placement_group_cleaner.is_actor_alive)
    cleaner = cleaner_cls(controller_actor_id="controller", check_interval_s=0.001, get_actor_timeout_s=1,
                          stop_timeout=1)
    monkeypatch.setattr(cleaner, "_is_placement_group_removed", lambda _: False)
    monkeypatch.setattr(cleaner, "_exit", lambda: None)  # not an actor here
    cleaner.register_placement_group(pg)
    cleaner._monitor_loop()
    calls = len(answers) - sum(1 for _ in states)
    return removed, calls


def test_ray_s_cleaner_removes_a_live_run_s_workers_on_an_empty_answer(monkeypatch):
    """The upstream behaviour this module works around (when this fails, Ray has fixed it: drop the override)."""
    removed, calls = _monitor(placement_group_cleaner.PlacementGroupCleaner, monkeypatch, [None, "ALIVE"])
    assert [pg.id for pg in removed] == ["pg-live"] and calls == 1  # removed at the first empty answer


def test_the_job_s_cleaner_keeps_a_live_run_s_workers_and_removes_a_dead_one_s(monkeypatch):
    removed, calls = _monitor(trainer.PlacementGroupCleaner, monkeypatch, [None, "ALIVE", None, None, "ALIVE", "DEAD"])
    assert calls == 6 and [pg.id for pg in removed] == ["pg-live"]  # only after the DEAD answer


def test_the_job_s_trainer_launches_its_cleaner_instead_of_ray_s():
    callbacks = trainer.Trainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))._create_default_callbacks()
    cleaners = [c for c in callbacks if isinstance(c, placement_group_callback.PlacementGroupCleanerCallback)]
    assert [type(c) for c in cleaners] == [trainer.PlacementGroupCleanerCallback]


@pytest.mark.parametrize("name", ["after_controller_start", "after_worker_group_start", "_stop_cleaner"])
def test_ray_s_callback_still_has_what_the_override_relies_on(name):
    assert callable(getattr(placement_group_callback.PlacementGroupCleanerCallback, name))

"""Failpoints: named points in the jobs where a test makes a process raise, die or wait, to prove the jobs survive.

Read from one environment variable, :data:`ENV`, and only here::

    CLIPN_FAILPOINTS="POINT=ACTION[,OPTION=VALUE...][;POINT=ACTION...]"

``ACTION`` is ``raise`` (the point's error: :class:`FailpointError`, or what the point declares, e.g. pyiceberg's
``CommitStateUnknownException``), ``kill`` (``os._exit(KILLED_EXIT)``: no cleanup, no ``finally``, like a
crash) or ``pause`` (block until the file named by ``until`` exists, then carry on). Options:

* ``at=N``: fire at the N-th time this process reaches the point (default: every time);
* ``once=PATH``: fire in one process only: the first to reach the point creates ``PATH``; later
  processes (a retried task, a restarted actor) see it and carry on;
* ``wait=S``: sleep S seconds before acting (a point that must first reach a defined state says so with
  ``settle``, see :func:`hit`: never a guess of how long that takes);
* ``until=PATH`` (``pause``): the file whose appearance ends the pause (at most :data:`PAUSE_LIMIT_S`);
* any other ``KEY=VALUE``: fire only when the point's context has ``KEY`` equal to ``VALUE``
  (``train.step`` passes ``step`` and ``rank``).

Points are declared in :data:`POINTS`; a spec naming another point is refused (a typo would
otherwise never fire, and a test relying on it would pass without testing anything).

Ray starts worker processes with the environment of the node, not the driver's current
one: pass :func:`ray_remote_args` to Ray Data stages and :func:`runtime_env` to Ray Train,
so that workers see the spec the driver saw (both are empty when no failpoint is set, so a
production run starts no extra worker).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from clipn_core.errors import ClipnError

log = logging.getLogger("clipn.failpoints")
ENV = "CLIPN_FAILPOINTS"
KILLED_EXIT = 137  # what a shell reports for a process killed by SIGKILL
PAUSE_LIMIT_S = 600.0
ACTIONS = ("raise", "kill", "pause")

POINTS: dict[str, str] = {
    # scoring job: Ray workers and the driver
    "score.decode.batch": "a read+decode task's worker, at each batch it starts",
    "score.scorer.batch": "a scorer actor, at each batch it scores",
    "score.staged": "the driver, with the whole run staged, before publishing",
    "lease.acquired": "the driver, right after taking its night's lease",
    # publishing a Parquet folder (jobs.score.publish)
    "parquet.success_delete.before": "before removing the partition's old _SUCCESS",
    "parquet.success_delete.after": "after removing the partition's old _SUCCESS",
    "parquet.move.before": "before each staged file is moved into the partition",
    "parquet.move.after": "after each staged file is moved into the partition",
    "parquet.manifest.before": "before writing _manifest.json, the switch to the new night",
    "parquet.manifest.after": "after writing _manifest.json",
    "parquet.delete_old.before": "before each file the manifest does not name is deleted",
    "parquet.delete_old.after": "after each file the manifest does not name is deleted",
    "parquet.success.before": "before writing _SUCCESS",
    "parquet.success.after": "after writing _SUCCESS",
    "staging.delete.before": "before a run's staged files are removed (both targets)",
    "staging.delete.after": "after a run's staged files are removed (both targets)",
    # committing to an Iceberg table (jobs.score.iceberg)
    "iceberg.commit.before": "before the catalog commit is sent",
    "iceberg.commit.after": "after the catalog accepted the commit",
    "iceberg.commit.unknown_before": "the commit is not sent and the catalog's answer is unknown "
                                     "(raises CommitStateUnknownException)",
    "iceberg.commit.unknown_after": "the commit landed but its answer was lost (raises CommitStateUnknownException)",
    "iceberg.refresh.before": "before reloading the table to resolve an unknown commit state",
    "iceberg.refresh.after": "after reloading the table to resolve an unknown commit state",
    # training job
    "train.step": "a training worker after each step (context: step, rank)",
}


class FailpointError(ClipnError):
    """Raised by a failpoint whose action is ``raise`` (and by a malformed :data:`ENV`)."""


@dataclass(frozen=True)
class Failpoint:
    """One parsed ``POINT=ACTION,...`` entry."""

    point: str
    action: str
    at: int | None = None
    once: str | None = None
    wait_s: float = 0.0
    until: str | None = None
    context: dict[str, str] = field(default_factory=dict)


def spec() -> str | None:
    """The raw value of :data:`ENV`, or None when unset or empty."""
    return os.environ.get(ENV) or None


def parse(text: str) -> dict[str, Failpoint]:
    """``POINT=ACTION[,OPTION=VALUE...];...`` -> failpoints by point; :class:`FailpointError` naming the variable
    and the entry at fault."""
    points: dict[str, Failpoint] = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        head, *options = [p.strip() for p in entry.split(",")]
        point, _, action = head.partition("=")
        if point not in POINTS:
            raise FailpointError(f"{ENV}: unknown failpoint {point!r} in {entry!r}; known: {sorted(POINTS)}")
        if action not in ACTIONS:
            raise FailpointError(f"{ENV}: {entry!r}: action must be one of {ACTIONS}")
        kwargs: dict = {"context": {}}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or not value:
                raise FailpointError(f"{ENV}: {entry!r}: expected KEY=VALUE, got {option!r}")
            try:
                if key == "at":
                    kwargs["at"] = int(value)
                elif key == "wait":
                    kwargs["wait_s"] = float(value)
                elif key in ("once", "until"):
                    kwargs[key] = value
                else:
                    kwargs["context"][key] = value
            except ValueError as e:
                raise FailpointError(f"{ENV}: {entry!r}: {key} needs a number, got {value!r}") from e
        if action == "pause" and not kwargs.get("until"):
            raise FailpointError(f"{ENV}: {entry!r}: pause needs until=PATH")
        points[point] = Failpoint(point, action, **kwargs)
    return points


_parsed: tuple[str | None, dict[str, Failpoint]] = (None, {})
_hits: Counter = Counter()


def _active() -> dict[str, Failpoint]:
    """The failpoints of the current :data:`ENV` value (parsed once per value; hit counts restart with it)."""
    global _parsed
    text = spec()
    if text != _parsed[0]:
        _parsed = (text, parse(text) if text else {})
        _hits.clear()
    return _parsed[1]


def check() -> None:
    """Parse :data:`ENV` now, so that a malformed spec fails the job at its start (:class:`FailpointError`)."""
    _active()


def hit(point: str, error: Callable[[], BaseException] | None = None, settle: Callable[[], object] | None = None,
        **context) -> None:
    """Reach ``point``: nothing unless :data:`ENV` names it (and its options match), else raise, die or pause.

    ``error``: what ``raise`` raises at this point (default :class:`FailpointError`); ``settle``: called once the
    failpoint fires, before ``wait`` and the action, to block until what the process started has landed (so a
    fault at ``train.step`` follows the registration of the checkpoint just reported, however slow the machine);
    ``context``: values the spec's ``KEY=VALUE`` filters compare with (as strings)."""
    if point not in POINTS:
        raise FailpointError(f"undeclared failpoint {point!r}")
    fp = _active().get(point)
    if fp is None:
        return
    for key, want in fp.context.items():
        if key not in context:
            raise FailpointError(f"{ENV}: failpoint {point} has no context {key!r} (it has {sorted(context)})")
        if str(context[key]) != want:
            return
    _hits[point] += 1
    if fp.at is not None and _hits[point] != fp.at:
        return
    if fp.once is not None:
        try:
            fd = os.open(fp.once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{point} {fp.action} in process {os.getpid()}\n".encode())
        os.close(fd)
    if settle is not None:
        settle()
    if fp.wait_s:
        time.sleep(fp.wait_s)
    log.warning("failpoint %s: %s (process %d, hit %d)", point, fp.action, os.getpid(), _hits[point])
    if fp.action == "kill":
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(KILLED_EXIT)
    if fp.action == "pause":
        deadline = time.monotonic() + PAUSE_LIMIT_S
        while not os.path.exists(fp.until):
            if time.monotonic() > deadline:
                raise FailpointError(f"failpoint {point}: {fp.until} did not appear within {PAUSE_LIMIT_S:.0f} s")
            time.sleep(0.05)
        return
    raise error() if error is not None else FailpointError(f"failpoint {point}")


@contextmanager
def around(step: str) -> Iterator[None]:
    """``<step>.before`` before the body and ``<step>.after`` once it succeeded."""
    hit(f"{step}.before")
    yield
    hit(f"{step}.after")


def runtime_env() -> dict:
    """A Ray runtime env that hands :data:`ENV` to workers (empty when no failpoint is set)."""
    text = spec()
    return {"env_vars": {ENV: text}} if text else {}


def ray_remote_args() -> dict:
    """Keyword arguments for Ray Data stages (``map_batches(..., **ray_remote_args())``): :func:`runtime_env`
    when a failpoint is set, nothing otherwise."""
    env = runtime_env()
    return {"runtime_env": env} if env else {}

"""Test hooks that kill a process once at a chosen point, to prove the jobs survive it.

Set by environment variable on the driver and handed to Ray tasks and actors as plain
arguments (Ray workers do not inherit the driver's environment):

* ``CLIPN_SCORE_FAULT=WHERE:N:MARKER`` (scoring job), ``WHERE`` one of
  ``scorer`` (the scorer actor processing its N-th batch), ``decode`` (a read+decode
  task's worker at its N-th batch) or ``driver`` (the driver after the run is fully
  staged, before publishing; N is ignored);
* ``CLIPN_TRAIN_FAULT=STEP:RANK:MARKER`` (training job, see :mod:`jobs.train_loop`).

``MARKER`` is a file path: the first process to reach the point creates it and dies
with ``os._exit(1)`` (no cleanup, like a crash); later processes see it and carry on, so
a retried task or restarted actor succeeds.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("clipn.faults")
SCORE_FAULT_ENV = "CLIPN_SCORE_FAULT"
_WHERE = ("scorer", "decode", "driver")
_calls: dict[str, int] = {}


def score_fault_from_env() -> str | None:
    """The driver's ``CLIPN_SCORE_FAULT`` spec, validated (``ValueError`` names the variable)."""
    spec = os.environ.get(SCORE_FAULT_ENV) or None
    if spec is not None:
        where, n, marker = (spec.split(":", 2) + ["", ""])[:3]
        if where not in _WHERE or not n.isdigit() or not marker:
            raise ValueError(f"{SCORE_FAULT_ENV}={spec!r}: expected WHERE:N:MARKER with WHERE in {_WHERE}")
    return spec


def die_once(marker: str, what: str) -> None:
    """Create ``marker`` and exit this process hard, unless ``marker`` already exists."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{what}\n".encode())
    os.close(fd)
    log.warning("fault injection: %s", what)
    os._exit(1)


def maybe_die(spec: str | None, where: str) -> None:
    """Count one call at ``where`` in this process; die once when ``spec`` names this point and count."""
    if not spec:
        return
    kind, n, marker = spec.split(":", 2)
    if kind != where:
        return
    _calls[where] = _calls.get(where, 0) + 1
    if where == "driver" or _calls[where] == int(n):
        die_once(marker, f"killed {where} process {os.getpid()} at call {_calls[where]}")


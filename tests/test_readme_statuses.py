"""The README's lists of row statuses and left-out reasons equal the code's, both ways."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from schemas.status import (
    LEFT_OUT_REASONS,
    PERMANENT_STATUSES,
    STATUS_OK,
    STATUSES,
    TRANSIENT_STATUSES,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def _bullets_after(marker: str) -> list[str]:
    """The names of the bullets (``- `name`: ...``) of the list after the one line that contains ``marker``."""
    lines = README.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if marker in line]
    assert len(starts) == 1, f"README: expected one line holding {marker!r}, found {len(starts)}"
    rest = lines[starts[0] + 1:]
    while rest and not rest[0].strip():  # the blank line before the list
        rest = rest[1:]
    names = []
    for line in rest:
        if not line.strip():  # the list ends at the next blank line
            break
        found = re.match(r"- `([a-z_]+)`:", line)
        if found:
            names.append(found.group(1))
    return names


@pytest.mark.parametrize(("marker", "code"), [
    ("Row statuses (`schemas/status.py`", STATUSES),
    ("counted by reason in the manifest's `left_out`:", LEFT_OUT_REASONS),
])
def test_readme_lists_equal_the_code(marker, code):
    listed = _bullets_after(marker)
    assert len(listed) == len(set(listed)), "a name listed twice"
    assert set(listed) == set(code), f"README only: {set(listed) - set(code)}; code only: {set(code) - set(listed)}"


def test_every_status_is_ok_transient_or_permanent_exactly_once():
    """A new status (a new decode error kind) must be classed: retried on the next nights or not."""
    for status in STATUSES:
        classes = [status == STATUS_OK, status in TRANSIENT_STATUSES, status in PERMANENT_STATUSES]
        assert classes.count(True) == 1, f"{status!r}: ok/transient/permanent = {classes}"
    assert TRANSIENT_STATUSES | PERMANENT_STATUSES | {STATUS_OK} == set(STATUSES)
    assert TRANSIENT_STATUSES == {"read_error"}

"""Test helper: the calibration a lake bank needs (its evidence's rate of flagging ID images), made by
``clipn calibrate`` in this process on a few images of a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

from jobs.cli import main as cli_main
from jobs.demo import world


def id_sample(folder: Path, classes: list[str], n: int = 12) -> Path:
    """``n`` images of the ``classes`` (the world's shapes), as an ID sample folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"id{i:02d}.jpg").write_bytes(world.encode(world.render(classes[i % len(classes)], "blue", 300 + i, 40)))
    return folder


def calibrate(ckpt: str, classes: list[str], sample: Path, out: Path, *extra: str) -> str:
    """The URI of the ``calibration.json`` that ``clipn calibrate`` writes for ``ckpt`` and ``classes`` from the
    ``sample`` folder. Negative labels are off unless ``extra`` says otherwise: ATD's rule, whose rate the bank
    reads, uses none, and mining them would cost the most here."""
    code = cli_main(["calibrate", "--data.kind", "prefix", "--data.uri", str(sample), "--model.checkpoint", ckpt,
                     "--classes.names", json.dumps(classes), "--output.dir", str(out), "--bootstrap", "10",
                     "--negatives.enabled", "false", *extra])
    assert code == 0
    return str(out / "calibration.json")

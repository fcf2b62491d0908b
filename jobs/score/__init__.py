"""The nightly scoring job: object storage -> read + decode (CPU tasks) -> CLIPN scorer actors -> Parquet.

One module per stage: :mod:`~jobs.score.read` (list the inputs, fetch bytes),
:mod:`~jobs.score.decode` (bytes -> pixels), :mod:`~jobs.score.scorer` (the actor pool),
:mod:`~jobs.score.publish` (staging, manifest, publish) and :mod:`~jobs.score.pipeline`
(the assembly, :func:`run`). Run it as ``clipn score --config score.yaml`` or, as a
``ray job submit`` entrypoint, ``python -m jobs score --config score.yaml``.

The package itself imports nothing heavy: Ray workers that unpickle a decode function
load only that stage's module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from schemas.manifest import ScoreManifest
    from schemas.score_config import ScoreJobConfig


def run(cfg: ScoreJobConfig) -> ScoreManifest:
    """Run the scoring job (:func:`jobs.score.pipeline.run`)."""
    from jobs.score.pipeline import run as run_pipeline

    return run_pipeline(cfg)

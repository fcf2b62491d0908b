"""``python benchmarks/ray_loader_cli.py <clipn args>``: the ``clipn`` CLI with Ray's own checkpoint loader.

Bench-only (``bench_resume.py --ab``): a resumable run plugs ``jobs.score.resume.DriverCheckpointLoader`` into
Ray's ``CheckpointConfig(checkpoint_manager_cls=...)``; this wrapper points that name at Ray 2.60's
``IdColumnCheckpointManager`` (Ray's default, the loader the driver-side one replaced) before it calls the CLI,
so the same dead state can be resumed once with each loader. Nothing in ``jobs/`` knows about it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray.data.checkpoint import IdColumnCheckpointManager  # noqa: E402

from jobs.score import resume  # noqa: E402

# resume.prepare looks the name up when it builds the run's CheckpointConfig, after this assignment
resume.DriverCheckpointLoader = IdColumnCheckpointManager

from jobs.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())

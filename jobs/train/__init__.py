"""``clipn train``: the training job (``job``), its pair data and decode step (``data``), the per-worker
loop (``loop``) and what each stage trains (``stages``)."""

from jobs.train.job import TrainingError, run
from jobs.train.loop import TrainDataError

__all__ = ["TrainDataError", "TrainingError", "run"]

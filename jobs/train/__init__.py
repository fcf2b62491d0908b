"""``clipn train``: the training job (``job``), its pair data and decode step (``data``), the per-worker
loop (``loop``) and what each stage trains (``stages``)."""

import importlib

# Lazy re-exports: importing one module of the package (``jobs.train.stages`` on the driver, in tests) must not
# import Ray Train through this file.
_EXPORTS = {"run": "jobs.train.job", "TrainingError": "jobs.train.job", "TrainDataError": "jobs.train.loop"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jobs.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

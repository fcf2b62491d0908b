"""``clipn demo`` (``make demo``): the demo job (``job``), its generated world of coloured shapes (``world``) and
the loopback S3 server it and the tests use (``s3``). The model library never imports this package."""

import importlib

# Lazy re-exports: the tests import ``jobs.demo.world`` alone, without the demo job's imports.
_EXPORTS = {**{name: "jobs.demo.job" for name in ("FULL", "SMALL", "DemoSize", "base_clip_path", "run_demo")},
            **{name: "jobs.demo.s3" for name in ("free_port", "start_moto")}}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jobs.demo' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

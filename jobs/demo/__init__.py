"""``clipn demo`` (``make demo``): the demo job (``job``), its generated world of coloured shapes (``world``) and
the loopback S3 server it and the tests use (``s3``). The model library never imports this package."""

from jobs.demo.job import FULL, SMALL, DemoSize, base_clip_path, run_demo
from jobs.demo.s3 import free_port, start_moto

__all__ = ["FULL", "SMALL", "DemoSize", "base_clip_path", "free_port", "run_demo", "start_moto"]

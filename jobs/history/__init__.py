"""``clipn history``: the nights of an output, one line each (:mod:`.table`), a plot (:mod:`.plot`), and the
drift check (:mod:`.check`); the nights' aggregates are read, or computed from the rows, by :mod:`.read`
with :mod:`.aggregates`."""

from jobs.history.job import run

__all__ = ["run"]

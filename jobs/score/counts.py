"""Count: how many inputs each stage saw, reported by the Ray tasks themselves, for the row check.

The row check (``run``) refuses to publish unless rows written + inputs skipped = inputs
listed, for every input kind. Nothing is inferred from the rows written: each number is
counted where it happens (a prefix's objects by its listing tasks, a manifest's lines on the
driver) or reported to :class:`InputCounts`, a small actor that keeps one report per key, so
a task that Ray retries replaces its first report instead of adding to it:

* a tar shard's read task reports its shard (key: the shard URI): members listed, skipped,
  left out by reason;
* the skip join's marking stage reports each batch (kept, skipped) under a digest of the
  batch's URIs: a retried task sees the same batch again, so the same key. Rows of one URI
  meet in one hash partition, so two batches hold the same URIs only if a partition is split
  into identical blocks; one would then not be counted and the check refuses the night
  rather than publish it.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import ray

LISTED = "listed"  # tar image members listed (a torn shard's unreadable rest: one)
KEPT = "kept"  # inputs the skip join kept
SKIPPED = "skipped"  # inputs the skip join removed, tar members the skip set left unread
RETRY_ADDED = "retry_added"  # inputs added back below the since watermark to retry a transient failure
RELISTED = "relisted"  # listed inputs scored as their added retry row instead (listed and added: scored once)
LEFT_OUT = "left_out:"  # prefix of the counts of inputs given no row, by reason


@ray.remote(num_cpus=0)
class InputCounts:
    """Named counts keyed by the unit of work that reported them (a shard, a batch); totals on demand."""

    def __init__(self):
        self.by_key: dict[str, dict[str, int]] = {}

    def report(self, key: str, numbers: dict[str, int]) -> None:
        self.by_key[key] = dict(numbers)

    def totals(self) -> dict[str, int]:
        """Each count summed over every key that reported it."""
        out: Counter[str] = Counter()
        for numbers in self.by_key.values():
            out.update(numbers)
        return dict(out)


def batch_key(stage: str, uris) -> str:
    """The report key of a batch: the stage and a digest of its URIs (order-free: a retry may reorder)."""
    h = hashlib.sha256()
    for uri in sorted(str(u) for u in uris):
        h.update(uri.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return f"{stage}:{len(uris)}:{h.hexdigest()}"



def totals(counts: InputCounts) -> tuple[dict[str, int], dict[str, int]]:
    """(counts by name, inputs left out by reason) once the dataset has run."""
    found = ray.get(counts.totals.remote())
    left_out = {k.removeprefix(LEFT_OUT): v for k, v in found.items() if k.startswith(LEFT_OUT) and v}
    return {k: v for k, v in found.items() if not k.startswith(LEFT_OUT)}, left_out

"""Count: how many inputs each stage saw, reported by the Ray tasks themselves, for the row check.

The row check (``run``) refuses to publish unless rows written + inputs skipped = inputs
listed, for every input kind. Nothing is inferred from the rows written: each number is
counted where it happens (a prefix's objects by its listing tasks, a manifest's lines on the
driver) or reported to :class:`InputCounts`, a small actor that keeps one report per key, so
a task that Ray retries replaces its first report instead of adding to it. One actor per run
(each is a worker process to start) holds two scopes:

* :data:`LISTING`: a prefix listing task reports each key range it listed (key: the range's
  number): objects listed, entries left out by reason;
* :data:`INPUTS`: a tar shard's read task reports its shard (key: the shard URI): members
  listed, skipped, left out by reason; the skip join's marking stage reports each batch
  (kept, skipped) under a digest of the batch's URIs: a retried task sees the same batch
  again, so the same key. Rows of one URI meet in one hash partition, so two batches hold the
  same URIs only if a partition is split into identical blocks; one would then not be
  counted and the check refuses the night rather than publish it.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import ray

LISTED = "listed"  # objects a listing range listed; tar image members listed (a torn shard's unreadable rest: one)
KEPT = "kept"  # inputs the skip join kept
SKIPPED = "skipped"  # inputs the skip join removed, tar members the skip set left unread
RETRY_ADDED = "retry_added"  # inputs added back below the since watermark to retry a transient failure
RELISTED = "relisted"  # listed inputs scored as their added retry row instead (listed and added: scored once)
LEFT_OUT = "left_out:"  # prefix of the counts of inputs given no row, by reason

INPUTS = "inputs"  # the scope of the read tasks' and the skip join's reports
LISTING = "listing"  # the scope of a prefix listing's per-range reports


@ray.remote(num_cpus=0)
class InputCounts:
    """Named counts keyed by the unit of work that reported them (a listing range, a shard, a batch) within a
    scope (:data:`LISTING`, :data:`INPUTS`); totals on demand."""

    def __init__(self):
        self.by_key: dict[tuple[str, str], dict[str, int]] = {}

    def report(self, key: str, numbers: dict[str, int], scope: str = INPUTS) -> None:
        self.by_key[(scope, key)] = dict(numbers)

    def totals(self, scope: str = INPUTS) -> dict[str, int]:
        """Each count summed over every key of ``scope`` that reported it."""
        out: Counter[str] = Counter()
        for (in_scope, _), numbers in self.by_key.items():
            if in_scope == scope:
                out.update(numbers)
        return dict(out)

    def reported(self, scope: str = INPUTS) -> int:
        """How many keys of ``scope`` reported."""
        return sum(1 for in_scope, _ in self.by_key if in_scope == scope)


def batch_key(stage: str, uris) -> str:
    """The report key of a batch: the stage and a digest of its URIs (order-free: a retry may reorder)."""
    h = hashlib.sha256()
    for uri in sorted(str(u) for u in uris):
        h.update(uri.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return f"{stage}:{len(uris)}:{h.hexdigest()}"



def totals(counts: InputCounts) -> tuple[dict[str, int], dict[str, int]]:
    """(counts by name, inputs left out by reason) of the :data:`INPUTS` scope once the dataset has run (a
    listing's own numbers: :meth:`jobs.score.listing.ObjectListing.totals`)."""
    found = ray.get(counts.totals.remote())
    left_out = {k.removeprefix(LEFT_OUT): v for k, v in found.items() if k.startswith(LEFT_OUT) and v}
    return {k: v for k, v in found.items() if not k.startswith(LEFT_OUT)}, left_out

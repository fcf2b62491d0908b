"""A bank of image proxies from the lake itself, for the lake-adaptive score (AdaNeg, NeurIPS 2024, per night).

After a night, the ``ok`` rows the ATD score is surest about give two sets of image
features, each clustered to at most ``clusters`` centroids:

* OOD proxies: rows in the lowest ``quantile`` of the night's ATD ID scores **and flagged
  OOD by the evidence** (``flagged_ood``: ATD's own threshold-free rule, ``ood_atd``, whose
  p_no-weighted "no" mass beats every ID class's term, or the night's calibrated threshold
  decision; the scoring job chooses, :func:`jobs.score.incremental.build_lake_bank`). A
  mostly-ID night's lowest tenth is hard ID images; taking them as OOD proxies would push
  the next night's ID images like them down, and the night after would learn from that.
  The bank's influence is capped by a minimum: fewer such rows than ``min_ood_share`` (half)
  of the lowest ``quantile``, or than ``min_ood_rows`` (4, the clustering's own size of a
  centroid, ``rows // 4``), leave the OOD side empty. Below half, the flags are at the rate
  of ATD's own false positives on ID images (1.5% of the demo's ID evaluation images, 3.2%
  of its ID calibration sample: ``benchmarks/bench_negatives.py``), so the proxies would
  stand for ID images as much as for OOD ones; the bank is for a lake's recurring OOD;
* ID proxies: rows in the highest ``quantile`` that the evidence does not flag.

The next night scores an image also by which side its nearest proxy lies on:
``S_img = sigmoid(s (max_k cos(f, id_k) - max_k cos(f, ood_k)))``, and
``clipn_neg_lake = clipn_neg * S_img`` (:mod:`clipn_core.scores`). A bank with an empty
side is no bank: ``clipn_neg_lake`` then equals ``clipn_neg``. ``meta`` says how many rows
and proxies each side has and, for an empty side, why.

The bank depends only on the rows, not on their order: rows are sampled by a hash of
their URI (at most ``max_rows`` of them), sorted by URI, and clustered with a fixed seed.
Within a run the bank is fixed, so a row's score never depends on the order in which
actors see the images; the bank changes only between runs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_QUANTILE = 0.1
DEFAULT_CLUSTERS = 128
DEFAULT_MAX_ROWS = 50_000
DEFAULT_MIN_OOD_ROWS = 4
DEFAULT_MIN_OOD_SHARE = 0.5


@dataclass(frozen=True)
class LakeBank:
    """ID and OOD image proxies [K, D] (L2-normalised float32) and how they were built (``meta``)."""

    id_proxies: torch.Tensor
    ood_proxies: torch.Tensor
    meta: dict

    @property
    def id(self) -> str:
        """sha256 (16 hex) of the proxies: identifies the scores they give."""
        h = hashlib.sha256(self.id_proxies.numpy().tobytes())
        h.update(self.ood_proxies.numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def empty(self) -> bool:
        return len(self.id_proxies) == 0 or len(self.ood_proxies) == 0


def keep_for_bank(uri: str, rate: float) -> bool:
    """Deterministic sampling by URI: the same rows are kept whatever their order or partitioning."""
    digest = int.from_bytes(hashlib.blake2b(uri.encode(), digest_size=8).digest(), "little")
    return digest < rate * 2**64


def build_bank(features: np.ndarray, id_scores: np.ndarray, flagged_ood: np.ndarray, uris: list[str],
               quantile: float = DEFAULT_QUANTILE, clusters: int = DEFAULT_CLUSTERS,
               min_ood_rows: int = DEFAULT_MIN_OOD_ROWS, min_ood_share: float = DEFAULT_MIN_OOD_SHARE, seed: int = 0,
               evidence: str = "ood_atd") -> LakeBank:
    """Proxies from ``features`` [n, D] (float) of ``ok`` rows, their ATD ID scores [n] and the evidence's OOD
    flags ``flagged_ood`` [n] (bool; ``evidence`` names it in ``meta``), as the module docstring says.

    Fewer than ``2 / quantile`` rows give an empty bank (the score then equals ``clipn_neg``). ``meta``:
    ``rows``, ``flagged_ood`` (rows the evidence flags), ``ood_rows`` / ``id_rows`` (rows each side's proxies
    come from), ``ood_rows_needed`` (the minimum), ``ood_proxies`` / ``id_proxies`` (centroids), ``empty`` (why the bank is empty, or None) and
    the settings. Raises ValueError when the arrays' lengths differ.
    """
    from sklearn.cluster import KMeans

    if not len(features) == len(id_scores) == len(flagged_ood) == len(uris):
        raise ValueError(f"features, id_scores, flagged_ood and uris differ in length: {len(features)}, "
                         f"{len(id_scores)}, {len(flagged_ood)}, {len(uris)}")
    order = np.argsort(np.asarray(uris, dtype=object), kind="stable")
    feats, scores = np.asarray(features, dtype=np.float32)[order], np.asarray(id_scores, dtype=np.float64)[order]
    flagged = np.asarray(flagged_ood, dtype=bool)[order]
    meta = {"rows": int(len(feats)), "quantile": quantile, "clusters": clusters, "seed": seed, "evidence": evidence,
            "min_ood_rows": min_ood_rows, "min_ood_share": min_ood_share, "flagged_ood": int(flagged.sum()),
            "ood_rows": 0, "id_rows": 0}
    dim = feats.shape[1] if feats.ndim == 2 else 0
    empty = torch.zeros((0, dim))
    if len(feats) < 2 / quantile:
        return LakeBank(empty, empty, {**meta, "ood_proxies": 0, "id_proxies": 0,
                                       "empty": f"{len(feats)} rows, fewer than 2 / quantile"})
    low, high = np.quantile(scores, quantile), np.quantile(scores, 1 - quantile)
    lowest = scores <= low
    ood_rows, id_rows = flagged & lowest, ~flagged & (scores >= high)
    needed = max(min_ood_rows, math.ceil(min_ood_share * lowest.sum()))
    meta.update(ood_rows=int(ood_rows.sum()), id_rows=int(id_rows.sum()), ood_rows_needed=needed)

    def centroids(rows: np.ndarray) -> torch.Tensor:
        k = max(1, min(clusters, len(rows) // 4))
        km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(rows)
        return F.normalize(torch.from_numpy(km.cluster_centers_.astype(np.float32)), dim=-1)

    reasons = []
    if ood_rows.sum() < needed:
        reasons.append(f"{int(ood_rows.sum())} of the {int(lowest.sum())} rows of the lowest {quantile:g} flagged OOD "
                       f"by {evidence}, fewer than {needed}")
    if not id_rows.any():
        reasons.append(f"no row of the highest {quantile:g} left unflagged by {evidence}")
    if reasons:  # one empty side is no bank (ScoreInputs): keep neither, so the file says so plainly
        return LakeBank(empty, empty, {**meta, "ood_proxies": 0, "id_proxies": 0, "empty": "; ".join(reasons)})
    bank = LakeBank(centroids(feats[id_rows]), centroids(feats[ood_rows]), meta)
    bank.meta.update(ood_proxies=len(bank.ood_proxies), id_proxies=len(bank.id_proxies), empty=None)
    return bank


def bank_bytes(bank: LakeBank) -> bytes:
    """The bank as a safetensors file (proxies; ``meta`` in its metadata)."""
    import safetensors.torch

    return safetensors.torch.save({"id_proxies": bank.id_proxies.contiguous(), "ood_proxies": bank.ood_proxies.contiguous()},
                                  metadata={"meta": json.dumps(bank.meta, sort_keys=True)})


def bank_from_bytes(data: bytes) -> LakeBank:
    """The bank written by :func:`bank_bytes`."""
    import safetensors.torch

    tensors = safetensors.torch.load(data)
    size = int.from_bytes(data[:8], "little")  # safetensors: an 8-byte header length, then the JSON header
    meta = json.loads(json.loads(data[8:8 + size]).get("__metadata__", {}).get("meta", "{}"))
    return LakeBank(tensors["id_proxies"], tensors["ood_proxies"], meta)

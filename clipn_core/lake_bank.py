"""A bank of image proxies from the lake itself, for the lake-adaptive score (AdaNeg, NeurIPS 2024, per night).

After a night, the ``ok`` rows the ATD score is surest about give two sets of image
features: the lowest ``quantile`` of ID-ness (flagged OOD with high confidence) and the
highest (surely ID). Each is clustered to at most ``clusters`` centroids. The next night
scores an image also by which side its nearest proxy lies on:
``S_img = sigmoid(s (max_k cos(f, id_k) - max_k cos(f, ood_k)))``, and
``clipn_neg_lake = clipn_neg * S_img`` (:mod:`clipn_core.scores`).

The bank depends only on the rows, not on their order: rows are sampled by a hash of
their URI (at most ``max_rows`` of them), sorted by URI, and clustered with a fixed seed.
Within a run the bank is fixed, so a row's score never depends on the order in which
actors see the images; the bank changes only between runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_QUANTILE = 0.1
DEFAULT_CLUSTERS = 128
DEFAULT_MAX_ROWS = 50_000


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


def build_bank(features: np.ndarray, id_scores: np.ndarray, uris: list[str], quantile: float = DEFAULT_QUANTILE,
               clusters: int = DEFAULT_CLUSTERS, seed: int = 0) -> LakeBank:
    """Proxies from ``features`` [n, D] of ``ok`` rows and their ATD ID scores [n] (module docstring).

    Fewer than ``2 / quantile`` rows give an empty bank (the score then equals ``clipn_neg``).
    """
    from sklearn.cluster import KMeans

    order = np.argsort(np.asarray(uris, dtype=object), kind="stable")
    feats, scores = np.asarray(features, dtype=np.float32)[order], np.asarray(id_scores, dtype=np.float64)[order]
    meta = {"rows": int(len(feats)), "quantile": quantile, "clusters": clusters, "seed": seed}
    dim = feats.shape[1] if feats.ndim == 2 else 0
    if len(feats) < 2 / quantile:
        empty = torch.zeros((0, dim))
        return LakeBank(empty, empty, meta)
    low, high = np.quantile(scores, quantile), np.quantile(scores, 1 - quantile)

    def centroids(rows: np.ndarray) -> torch.Tensor:
        k = max(1, min(clusters, len(rows) // 4))
        km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(rows)
        return F.normalize(torch.from_numpy(km.cluster_centers_.astype(np.float32)), dim=-1)

    return LakeBank(centroids(feats[scores >= high]), centroids(feats[scores <= low]), meta)


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

"""A bank of image proxies from the lake itself, for the lake-adaptive score (AdaNeg, NeurIPS 2024, per night).

After a night, the ``ok`` rows the ATD score is surest about give two sets of image
features, each clustered to at most ``clusters`` centroids:

* OOD proxies: rows in the lowest ``quantile`` of the night's ATD ID scores **and flagged
  OOD by the evidence** (:class:`Evidence`: ATD's threshold-free rule ``ood_atd``, or a
  calibrated threshold decision ``is_ood``; the scoring job chooses,
  :func:`jobs.score.lake_bank.bank_evidence`), taken only when the night passes the gate below;
* ID proxies: rows in the highest ``quantile`` that the evidence does not flag.

The gate. The evidence flags some ID images too, at a rate ``p`` known from a calibration
on an ID sample (``clipn calibrate``), taken at its 95% upper bound from the sample's size
(:attr:`Evidence.id_flag_rate_bound`: a small sample that flagged nothing does not make
``p`` zero). Of the ``n`` rows
of the night's bank sample, at most about ``p * n`` flags are then ID images, even if
every row of the night were ID; with ``f`` rows flagged, the flagged rows' purity (share
of OOD among them) is at least ``1 - p * n / f``. OOD proxies are taken only when that
lower bound is at least ``min_purity`` and at least ``min_ood_rows`` flagged rows lie in
the lowest ``quantile``; otherwise the OOD side is empty and ``meta["empty"]`` says why.
The gate it replaces (flags on at least half of the lowest tenth) passed an all-ID night
whenever the evidence over-flags: ATD's rule flags 48-58% of the ID images of the real
photos (README, Real photos), so such a night's hard ID images became "OOD" proxies, the
next night pushed images like them down, and the night after learned from that. The
bound is a bound in expectation: ``p`` is the calibration sample's share, and a night
whose ID images differ from that sample flags them at another rate.

The next night scores an image also by which side its nearest proxy lies on:
``S_img = sigmoid(s (max_k cos(f, id_k) - max_k cos(f, ood_k)))``, and
``clipn_neg_lake = clipn_neg * S_img`` (:mod:`clipn_core.scores`). A bank with an empty
side is no bank: ``clipn_neg_lake`` then equals ``clipn_neg``. ``meta`` says how many rows
and proxies each side has, the evidence, its ID flag rate and where it comes from, the
purity bound and, for an empty side, why.

The bank depends only on the rows, not on their order: rows are sampled by a hash of
their URI (by the caller, :func:`keep_for_bank`), sorted by URI, and clustered with a
fixed seed. Within a run the bank is fixed, so a row's score never depends on the order
in which actors see the images; the bank changes only between runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

RATE_CONFIDENCE = 0.95  # of the upper bound the gate takes for the evidence's rate of flagging ID images


@dataclass(frozen=True)
class Evidence:
    """Which OOD flags the OOD proxies come from and how often they flag ID images.

    ``column``: the output column of the flags (``ood_atd`` or ``is_ood``); ``id_flag_rate``: the share (0-1)
    of a calibration's ID sample those flags mark OOD; ``calibration_id``: that calibration's id;
    ``sample_images``: the sample's size, which :attr:`id_flag_rate_bound` needs. Raises ValueError for a
    rate outside [0, 1] or a sample under one image."""

    column: str
    id_flag_rate: float
    calibration_id: str
    sample_images: int

    def __post_init__(self):
        if not 0.0 <= self.id_flag_rate <= 1.0:
            raise ValueError(f"id_flag_rate must be a share in [0, 1], got {self.id_flag_rate}")
        if self.sample_images < 1:
            raise ValueError(f"sample_images must be at least 1, got {self.sample_images}")

    @property
    def id_flag_rate_bound(self) -> float:
        """One-sided ``RATE_CONFIDENCE`` upper bound (Clopper-Pearson, exact binomial) of the rate, from the
        sample's ``k = round(id_flag_rate * sample_images)`` flagged images: what the gate takes as ``p``, since a
        sample that flagged none of 200 ID images leaves a true rate up to 1.5% likely
        (``1 - 0.05 ** (1 / 200)``), and a night's ID images flagged at that rate would otherwise pass as OOD."""
        from scipy.stats import beta

        n = self.sample_images
        k = min(n, round(self.id_flag_rate * n))
        return 1.0 if k == n else float(beta.ppf(RATE_CONFIDENCE, k + 1, n - k))


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
               evidence: Evidence, *, quantile: float, clusters: int, min_ood_rows: int, min_purity: float,
               seed: int = 0) -> LakeBank:
    """Proxies from ``features`` [n, D] (float) of ``ok`` rows, their ATD ID scores [n] and the ``evidence``'s OOD
    flags ``flagged_ood`` [n] (bool), as the module docstring says: ``quantile`` in (0, 0.5], the share of rows
    at each end; ``clusters``, the most centroids a side gets; ``min_ood_rows`` and ``min_purity``, the gate.

    Fewer than ``2 / quantile`` rows give an empty bank (the score then equals ``clipn_neg``). ``meta``:
    ``rows``, ``flagged_ood`` (rows the evidence flags), ``ood_rows`` / ``id_rows`` (rows each side's proxies
    come from), ``id_flag_rate``, its upper bound ``id_flag_rate_bound`` (the gate's ``p``),
    ``calibration_sample_images`` and ``calibration_id`` (the evidence's), ``purity_bound`` (None when nothing is
    flagged), ``ood_proxies`` / ``id_proxies`` (centroids), ``empty`` (why the bank is empty, or None) and the
    settings. Raises ValueError when the arrays' lengths differ.
    """
    from sklearn.cluster import KMeans

    if not len(features) == len(id_scores) == len(flagged_ood) == len(uris):
        raise ValueError(f"features, id_scores, flagged_ood and uris differ in length: {len(features)}, "
                         f"{len(id_scores)}, {len(flagged_ood)}, {len(uris)}")
    order = np.argsort(np.asarray(uris, dtype=object), kind="stable")
    feats, scores = np.asarray(features, dtype=np.float32)[order], np.asarray(id_scores, dtype=np.float64)[order]
    flagged = np.asarray(flagged_ood, dtype=bool)[order]
    n, f, p = len(feats), int(flagged.sum()), evidence.id_flag_rate_bound
    bound = 1.0 - p * n / f if f else None
    meta = {"rows": n, "quantile": quantile, "clusters": clusters, "seed": seed, "evidence": evidence.column,
            "id_flag_rate": evidence.id_flag_rate, "id_flag_rate_bound": p,
            "calibration_sample_images": evidence.sample_images,
            "calibration_id": evidence.calibration_id, "min_ood_rows": min_ood_rows,
            "min_purity": min_purity, "flagged_ood": f, "purity_bound": bound, "ood_rows": 0, "id_rows": 0}
    dim = feats.shape[1] if feats.ndim == 2 else 0
    empty = torch.zeros((0, dim))
    if n < 2 / quantile:
        return LakeBank(empty, empty, {**meta, "ood_proxies": 0, "id_proxies": 0,
                                       "empty": f"{n} rows, fewer than 2 / quantile"})
    low, high = np.quantile(scores, quantile), np.quantile(scores, 1 - quantile)
    ood_rows, id_rows = flagged & (scores <= low), ~flagged & (scores >= high)
    meta.update(ood_rows=int(ood_rows.sum()), id_rows=int(id_rows.sum()))

    def centroids(rows: np.ndarray) -> torch.Tensor:
        k = max(1, min(clusters, len(rows) // 4))
        km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(rows)
        return F.normalize(torch.from_numpy(km.cluster_centers_.astype(np.float32)), dim=-1)

    reasons = []
    if bound is None:
        reasons.append(f"no row flagged OOD by {evidence.column}")
    elif bound < min_purity:
        reasons.append(f"{f} of {n} rows flagged OOD by {evidence.column}, which flags up to {p:.1%} of ID images "
                       f"({evidence.id_flag_rate:.1%} of the {evidence.sample_images} of calibration "
                       f"{evidence.calibration_id}): as few as {max(bound, 0.0):.1%} of the flagged rows may be OOD, "
                       f"below min_purity {min_purity:g}")
    if ood_rows.sum() < min_ood_rows:
        reasons.append(f"{int(ood_rows.sum())} rows of the lowest {quantile:g} flagged OOD by {evidence.column}, "
                       f"fewer than min_ood_rows {min_ood_rows}")
    if not id_rows.any():
        reasons.append(f"no row of the highest {quantile:g} left unflagged by {evidence.column}")
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

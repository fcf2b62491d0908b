"""Score: a callable class run on a Ray actor pool; loads the model once per actor.

Input batches are the rows of :mod:`jobs.score.decode`: uint8 ``pixels`` (decoded in
CPU tasks) or encoded ``data`` (decoded here by :class:`~clipn_core.device_decode.DeviceDecoder`,
nvJPEG on CUDA). Output batches are Arrow tables with exactly
:data:`schemas.output.OUTPUT_SCHEMA`. Rows whose status is not ``ok`` pass through with
null scores, so every input keeps its one row.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import torch

import clipn_core as cc
from clipn_core.device_decode import DeviceDecoder
from clipn_core.images import split_preprocessor
from clipn_core.storage import Storage
from jobs import failpoints
from jobs.scoring_setup import load_model
from schemas.output import OUTPUT_SCHEMA, STATUS_OK, ood_column, score_column
from schemas.score_config import DecisionConfig, ModelConfig, RuntimeConfig


def is_ood_column(decision: DecisionConfig, scores: dict[str, np.ndarray], decisions: dict[str, np.ndarray]) -> np.ndarray:
    """The configured decision: CTW's or ATD's own rule, or ``score < threshold``."""
    if decision.rule == "threshold":
        return scores[decision.score] < decision.threshold
    return decisions[decision.rule]


def scoring_device(runtime: RuntimeConfig) -> str:
    """``cuda`` when the actor holds a GPU and CUDA is visible, else ``cpu``."""
    return "cuda" if runtime.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"


class ScorerActor:
    """Ray Data callable class: decoded pixels or encoded bytes + status -> one output row per input row.

    ``scoring``: the negative labels and lake bank (:meth:`~jobs.scoring_setup.ScoringSetup.scorer_kwargs`),
    fixed for the whole run."""

    def __init__(self, model_cfg: ModelConfig, heads: cc.ClassHeads, runtime: RuntimeConfig,
                 decision: DecisionConfig, storage: Storage, run_id: str, embeddings: bool, logit_scale: float,
                 scoring: dict | None = None):
        if runtime.torch_threads:
            torch.set_num_threads(runtime.torch_threads)
        model, self.model_id = load_model(model_cfg, storage, runtime.cache_dir)
        device = scoring_device(runtime)
        self.scorer = cc.BatchScorer(model, heads, device, runtime.precision, logit_scale,
                                     runtime.mcm_temperature, compile=runtime.compile, **(scoring or {}))
        pre = split_preprocessor(model.preprocess_cfg, mode=runtime.preprocess)
        self.device_decoder = DeviceDecoder(pre, device, runtime.max_pixels)
        self.class_names = np.array(heads.class_names, dtype=object)
        self.class_set_hash = heads.class_set_hash
        self.decision = decision
        self.run_id = run_id
        self.embeddings = embeddings

    def _decoded(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, torch.Tensor, np.ndarray, np.ndarray]:
        """(ok mask [n], uint8 pixels of the ok rows, status [n], error [n]) after any device decoding."""
        status, error = batch["status"].copy(), batch["error"].copy()
        ok = np.asarray(status == STATUS_OK, dtype=bool)
        if "pixels" in batch:
            return ok, torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])), status, error
        idx = np.flatnonzero(ok)
        out = self.device_decoder([bytes(batch["data"][i]) for i in idx])
        for j, err in out.errors.items():
            status[idx[j]], error[idx[j]] = err.kind.value, err.message
        ok = np.asarray(status == STATUS_OK, dtype=bool)
        return ok, out.pixels, status, error

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        failpoints.hit("score.scorer.batch")
        n = len(batch["uri"])
        ok, pixels, status, error = self._decoded(batch)
        cols: dict[str, pa.Array] = {}

        def full(values: np.ndarray, pa_type) -> pa.Array:
            """Scatter values of the ok rows into a length-n array, null elsewhere."""
            out = np.zeros(n, dtype=values.dtype if values.size else np.float32)
            out[ok] = values
            return pa.array(out, type=pa_type, mask=~ok)

        if ok.any():
            res = self.scorer.score_pixels(pixels)
            idx = res.predicted_index
            cols["predicted_class"] = pa.array(_scatter(self.class_names[idx], ok, n), type=pa.string())
            cols["predicted_index"] = full(idx.astype(np.int32), pa.int32())
            cols["predicted_prob"] = full(res.predicted_prob.astype(np.float32), pa.float32())
            for name in res.scores:  # a score it cannot compute (no negative labels) stays null
                cols[score_column(name)] = full(res.scores[name].astype(np.float32), pa.float32())
            for name, flags in res.decisions.items():
                cols[ood_column(name)] = full(flags.astype(bool), pa.bool_())
            cols["is_ood"] = full(is_ood_column(self.decision, res.scores, res.decisions).astype(bool), pa.bool_())
            if self.embeddings:
                emb = res.embeddings.astype(np.float16)
                rows = iter(emb)
                cols["embedding"] = pa.array([next(rows) if o else None for o in ok], type=pa.list_(pa.float16()))
        now = dt.datetime.now(dt.timezone.utc)
        base = {
            "uri": pa.array(batch["uri"].tolist(), pa.string()),
            "byte_size": pa.array(np.asarray(batch["byte_size"], dtype=np.int64), pa.int64(),
                                  mask=np.asarray(batch["byte_size"]) < 0),
            "status": pa.array(status.tolist(), pa.string()),
            "error": pa.array([e or None for e in error.tolist()], pa.string()),
            "model_id": pa.array([self.model_id] * n, pa.string()),
            "class_set_hash": pa.array([self.class_set_hash] * n, pa.string()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "scored_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        }
        arrays = []
        for field in OUTPUT_SCHEMA:
            arr = base.get(field.name, cols.get(field.name))
            arrays.append(arr if arr is not None else pa.nulls(n, field.type))
        return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)


def _scatter(values: np.ndarray, ok: np.ndarray, n: int) -> np.ndarray:
    """Object array of length n: ``values`` at the ok rows, None elsewhere."""
    out = np.empty(n, dtype=object)
    out[ok] = values
    return out

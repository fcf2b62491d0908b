"""Score: a callable class run on a Ray actor pool; loads the model once per actor.

Input batches are the rows of :mod:`jobs.score.decode`: uint8 ``pixels`` (decoded in
CPU tasks) or ``data`` + ``header`` (plain JPEGs decoded here in batches by
:class:`~clipn_core.device_decode.DeviceDecoder`, nvJPEG on CUDA, and pixels the read task
decoded). Output batches are Arrow tables with exactly :data:`schemas.output.OUTPUT_SCHEMA`,
built column by column from numpy arrays. Rows whose status is not ``ok`` pass through with
null scores, so every input keeps its one row. Several calls may run at once on one actor
(``runtime.actor_concurrency``): each keeps its own CUDA stream, and shares nothing it writes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
import warnings

import numpy as np
import pyarrow as pa
import torch

import clipn_core as cc
from clipn_core.device_decode import DeviceDecoder
from clipn_core.images import split_preprocessor
from clipn_core.inference import HostScores
from clipn_core.storage import Storage
from jobs import failpoints
from jobs.score.metrics import RunMetrics
from jobs.scoring_setup import load_model
from schemas.output import OUTPUT_SCHEMA, STATUS_OK, ood_column, score_column
from schemas.score_config import DecisionConfig, ModelConfig, RuntimeConfig

# Ray hands the actor read-only views of its object store; the pixels are only read (normalisation casts into a new
# tensor), so torch's warning about non-writable arrays says nothing here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def is_ood_column(decision: DecisionConfig, scores: dict[str, np.ndarray], decisions: dict[str, np.ndarray]) -> np.ndarray:
    """The configured decision: CTW's or ATD's own rule, or ``score < threshold``."""
    if decision.rule == "threshold":
        return scores[decision.score] < decision.threshold
    return decisions[decision.rule]


def scoring_device(runtime: RuntimeConfig) -> str:
    """``cuda`` when the actor holds a GPU and CUDA is visible, else ``cpu``."""
    return "cuda" if runtime.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"


class Scoring:
    """What a scorer actor does to each batch, given a ready scorer: decoded pixels or encoded bytes + status ->
    one output row per input row (:data:`~schemas.output.OUTPUT_SCHEMA`).

    ``scorer``: the model, heads, negative labels and lake bank on the scoring device; ``decoder``: the
    device decoder for batches of encoded ``data``; ``model_id``, ``run_id``: written into every row;
    ``metrics``: where each call's rows and wall time are recorded (:mod:`jobs.score.metrics`), or None."""

    def __init__(self, scorer: cc.BatchScorer, decoder: DeviceDecoder, heads: cc.ClassHeads,
                 decision: DecisionConfig, model_id: str, run_id: str, embeddings: bool,
                 metrics: RunMetrics | None = None):
        self.scorer = scorer
        self.device_decoder = decoder
        self._class_names = pa.array(heads.class_names, pa.string())
        self.class_set_hash = heads.class_set_hash
        self.decision = decision
        self.model_id = model_id
        self.run_id = run_id
        self.embeddings = embeddings
        self.metrics = metrics
        self._local = threading.local()

    def _stream(self):
        """This call's CUDA stream (one per thread, so that calls running at once overlap their copies, forwards
        and row building); nothing on the CPU."""
        device = self.scorer.device
        if device.type != "cuda":
            return contextlib.nullcontext()
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(device)
        return torch.cuda.stream(stream)

    def _decoded(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, torch.Tensor, np.ndarray, np.ndarray]:
        """(ok mask [n], uint8 pixels of the ok rows, status [n], error [n]) after any device decoding."""
        status, error = batch["status"], batch["error"]
        ok = np.asarray(status == STATUS_OK, dtype=bool)
        if "pixels" in batch:
            pixels = torch.from_numpy(batch["pixels"])  # a view: nothing writes to it
            return ok, (pixels if ok.all() else pixels[torch.from_numpy(ok)]), status, error
        data, header = batch["data"], batch["header"]
        jpeg = ok & (header[:, 0] > 0)  # the rest of the ok rows hold pixels decoded by the read task
        jpeg_rows, raw_rows = np.flatnonzero(jpeg), np.flatnonzero(ok & ~jpeg)
        out = self.device_decoder.decode_planned(data[jpeg_rows].tolist(), header[jpeg_rows])
        parts, order = [out.pixels], [jpeg_rows[out.rows]]  # [0, 3, *size] when the decoder had nothing
        if len(raw_rows):  # the read task's pixels, at the preprocessor's size (not square for every geometry)
            raw = np.frombuffer(b"".join(data[raw_rows].tolist()), dtype=np.uint8).reshape(
                -1, 3, *self.device_decoder.pre.size)
            parts.append(torch.from_numpy(raw).to(out.pixels.device, non_blocking=True))
            order.append(raw_rows)
        if out.errors:
            status, error = status.copy(), error.copy()
            for j, err in out.errors.items():
                status[jpeg_rows[j]], error[jpeg_rows[j]] = err.kind.value, err.message
            ok = np.asarray(status == STATUS_OK, dtype=bool)
        rows = np.concatenate(order)
        pixels = torch.cat(parts) if len(parts) > 1 else parts[0]
        if len(rows) > 1 and (np.diff(rows) < 0).any():  # back to row order, as the ok mask scatters them
            pixels = pixels[torch.from_numpy(np.argsort(rows, kind="stable")).to(pixels.device)]
        return ok, pixels, status, error

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        failpoints.hit("score.scorer.batch")
        t0 = time.perf_counter()
        with self._stream():
            ok, pixels, status, error = self._decoded(batch)
            host = self.scorer.device_scores(pixels, self.embeddings).to_host() if ok.any() else None
        table = self._table(batch, ok, status, error, host)
        if self.metrics is not None:
            self.metrics.batch_seconds(time.perf_counter() - t0)
            self.metrics.rows(table)
        return table

    def _table(self, batch: dict[str, np.ndarray], ok: np.ndarray, status: np.ndarray, error: np.ndarray,
               res: HostScores | None) -> pa.Table:
        """The output rows: whole columns built from numpy arrays, no Python per row."""
        n = len(ok)
        every = bool(ok.all())
        ok_idx = None if every else np.flatnonzero(ok)

        def full(values: np.ndarray, pa_type) -> pa.Array:
            """values of the ok rows as a length-n array, null elsewhere (a zero-copy view when all are ok)."""
            if every:
                return pa.array(values, type=pa_type)
            out = np.zeros(n, dtype=values.dtype)
            out[ok_idx] = values
            return pa.array(out, type=pa_type, mask=~ok)

        cols: dict[str, pa.Array] = {}
        if res is not None:
            index = full(res.predicted_index, pa.int32())
            cols["predicted_index"] = index
            cols["predicted_class"] = self._class_names.take(index)  # a null index gives a null name
            cols["predicted_prob"] = full(res.predicted_prob, pa.float32())
            for name, values in res.scores.items():  # a score it cannot compute (no negative labels) stays null
                cols[score_column(name)] = full(values, pa.float32())
            for name, flags in res.decisions.items():
                cols[ood_column(name)] = full(flags, pa.bool_())
            cols["is_ood"] = full(np.asarray(is_ood_column(self.decision, res.scores, res.decisions), dtype=bool),
                                  pa.bool_())
            if res.embeddings is not None:
                dim = res.embeddings.shape[1]
                offsets = np.zeros(n + 1, dtype=np.int32)
                np.cumsum(np.where(ok, dim, 0), out=offsets[1:])
                cols["embedding"] = pa.ListArray.from_arrays(
                    pa.array(offsets), pa.array(res.embeddings.reshape(-1)), type=pa.list_(pa.float16()),
                    mask=None if every else pa.array(~ok))
        size = np.asarray(batch["byte_size"], dtype=np.int64)
        base = {
            "uri": pa.array(batch["uri"], pa.string()),
            "byte_size": pa.array(size, pa.int64(), mask=size < 0),
            "status": pa.array(status, pa.string()),
            "error": pa.array(error, pa.string(), mask=np.asarray(error == "", dtype=bool)),
            "model_id": pa.repeat(pa.scalar(self.model_id, pa.string()), n),
            "class_set_hash": pa.repeat(pa.scalar(self.class_set_hash, pa.string()), n),
            "run_id": pa.repeat(pa.scalar(self.run_id, pa.string()), n),
            "scored_at": pa.repeat(pa.scalar(dt.datetime.now(dt.timezone.utc), pa.timestamp("us", tz="UTC")), n),
        }
        arrays = []
        for field in OUTPUT_SCHEMA:
            arr = base.get(field.name, cols.get(field.name))
            arrays.append(arr if arr is not None else pa.nulls(n, field.type))
        return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)


class ScorerActor(Scoring):
    """Ray Data callable class: loads the model once per actor, then scores each batch (:class:`Scoring`).

    ``scoring``: the negative labels and lake bank (:meth:`~jobs.scoring_setup.ScoringSetup.scorer_kwargs`),
    fixed for the whole run. Records the run's scorer metrics (:mod:`jobs.score.metrics`)."""

    def __init__(self, model_cfg: ModelConfig, heads: cc.ClassHeads, runtime: RuntimeConfig,
                 decision: DecisionConfig, storage: Storage, run_id: str, embeddings: bool, logit_scale: float,
                 scoring: dict | None = None):
        if runtime.torch_threads:
            torch.set_num_threads(runtime.torch_threads)
        model, model_id = load_model(model_cfg, storage, runtime.cache_dir)
        device = scoring_device(runtime)
        scorer = cc.BatchScorer(model, heads, device, runtime.precision, logit_scale,
                                runtime.mcm_temperature, compile=runtime.compile, **(scoring or {}))
        decoder = DeviceDecoder(split_preprocessor(model.preprocess_cfg, mode=runtime.preprocess), device,
                                runtime.max_pixels)
        super().__init__(scorer, decoder, heads, decision, model_id, run_id, embeddings, RunMetrics(run_id))

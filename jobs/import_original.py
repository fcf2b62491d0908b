"""``clipn import-original``: released CLIPN weights -> a nightly-ready clipn-lake checkpoint.

Runs in one process: check that the output is writable, import the original checkpoint
(``weights_only`` unpickling, strict keys, K read from the prompts) over the base CLIP built
from the pretrained configuration it was trained from (``pretrained_config``, by default the
original code's ``laion2b_s34b_b88k``), write our
``.safetensors`` and its sidecar (architecture, open_clip model and preprocessing config,
K, the source's identity, the base CLIP's logit scale). The sidecar is written last, so
a failed import leaves no loadable checkpoint behind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import clipn_core as cc
from clipn_core.errors import redact_uri
from schemas.import_config import ImportJobConfig

log = logging.getLogger("clipn.import")


@dataclass(frozen=True)
class ImportResult:
    """What was written: the checkpoint URI, its model id (sha256 of the weights), K and the logit scale."""

    checkpoint: str
    model_id: str
    num_prompts: int
    logit_scale: float


def run(cfg: ImportJobConfig) -> ImportResult:
    """Import ``cfg.checkpoint``; raises a :class:`~clipn_core.ClipnError` naming the file or key at fault."""
    storage = cfg.storage.bind()
    storage.check_writable(cfg.output, "output")
    model, spec = cc.import_original_checkpoint(cfg.checkpoint, cfg.architecture, storage.options, cfg.cache_dir,
                                                cfg.pretrained_config)
    model_id = cc.save_checkpoint(model, spec, cfg.output, storage.options)
    log.info("imported %s (%s built as %s, K=%d) -> %s", redact_uri(cfg.checkpoint), cfg.architecture,
             spec.base_weights["pretrained_config"], spec.num_prompts, redact_uri(cfg.output))
    return ImportResult(redact_uri(cfg.output), model_id, spec.num_prompts, model.logit_scale)

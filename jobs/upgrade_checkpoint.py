"""``clipn upgrade-checkpoint``: re-save a checkpoint built as its base weights were trained.

Checkpoints written before base CLIPs followed their pretrained configuration ran OpenAI-style
weights (QuickGELU-trained) with GELU; loading one now fails with a line naming this command.
The upgrade reads the sidecar and weights (sha256 checked), applies the configuration's
activation and preprocessing, and writes a new checkpoint (weights first, sidecar last) with a
new model id, so calibrations and skip-sets made with the old model are not mixed with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from clipn_core.errors import redact_uri
from clipn_core.weights import upgrade_checkpoint
from schemas.import_config import UpgradeCheckpointConfig

log = logging.getLogger("clipn.upgrade")


@dataclass(frozen=True)
class UpgradeResult:
    """The new checkpoint, its model id and the configuration it was built from."""

    checkpoint: str
    model_id: str
    pretrained_config: str
    quick_gelu: bool


def run(cfg: UpgradeCheckpointConfig) -> UpgradeResult:
    """Upgrade ``cfg.checkpoint`` into ``cfg.output``; raises a :class:`~clipn_core.ClipnError` naming the file."""
    storage = cfg.storage.bind()
    storage.check_writable(cfg.output, "output")
    model_id, spec = upgrade_checkpoint(cfg.checkpoint, cfg.output, cfg.pretrained_config, storage.options,
                                        cfg.cache_dir)
    quick_gelu = bool(spec.model_cfg.get("quick_gelu", False))
    log.info("upgraded %s -> %s (built as %s, %s); a no tower trained on the old model should be retrained, and "
             "calibrations redone", redact_uri(cfg.checkpoint), redact_uri(cfg.output),
             spec.base_weights["pretrained_config"], "QuickGELU" if quick_gelu else "GELU")
    return UpgradeResult(redact_uri(cfg.output), model_id, spec.base_weights["pretrained_config"], quick_gelu)

"""clipn_core: the CLIPN model library (model, weights, heads, scores, losses, metrics, images).

Never imports Ray: usable in a notebook, a Ray actor or a plain script. Names are
loaded on first use (PEP 562), so ``import clipn_core.images`` in a decode worker
costs Pillow and NumPy, not torch and open_clip.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS = {
    **dict.fromkeys(("CacheError", "CalibrationError", "CheckpointKeyError", "ClassListError", "ClipnError", "CommitConflictError",
                     "InputError",
                     "ModelConfigError", "StorageError", "TemplateError", "WeightsError"), "errors"),
    **dict.fromkeys(("ClassHeads", "build_class_heads", "class_set_hash", "load_class_names", "load_templates",
                     "validate_class_names"), "heads"),
    **dict.fromkeys(("DecodedImage", "DecodeError", "DecodeErrorKind", "decode_image", "image_transform"), "images"),
    **dict.fromkeys(("BatchScorer", "BatchScores"), "inference"),
    **dict.fromkeys(("ClipnLoss", "clipn_loss", "itbo_loss", "tso_loss"), "losses"),
    **dict.fromkeys(("OODMetrics", "fpr_at_tpr", "ood_metrics", "top1_accuracy"), "metrics"),
    **dict.fromkeys(("CLIPN", "NoTextTower", "get_tokenizer"), "model"),
    **dict.fromkeys(("SCORES", "ScoreInputs", "ScoreResult", "compute_scores"), "scores"),
    **dict.fromkeys(("ModelSpec", "build_clipn", "import_original_checkpoint", "load_checkpoint", "save_base_clip",
                     "save_checkpoint"), "weights"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipn_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

"""clipn_core: the CLIPN model library (model, weights, heads, scores, losses, metrics, images).

Never imports Ray: usable in a notebook, a Ray actor or a plain script.
"""

from . import architectures  # noqa: F401  (registers model_configs/*.json with open_clip)
from .errors import (
    CheckpointKeyError,
    ClassListError,
    ClipnError,
    ModelConfigError,
    StorageError,
    TemplateError,
    WeightsError,
)
from .heads import (
    ClassHeads,
    build_class_heads,
    class_set_hash,
    load_templates,
    validate_class_names,
)
from .images import DecodedImage, DecodeError, DecodeErrorKind, decode_image, image_transform
from .inference import BatchScorer, BatchScores
from .losses import ClipnLoss, clipn_loss, itbo_loss, tso_loss
from .metrics import OODMetrics, fpr_at_tpr, ood_metrics, top1_accuracy
from .model import CLIPN, NoTextTower, get_tokenizer
from .scores import SCORES, ScoreInputs, ScoreResult, compute_scores
from .weights import (
    ModelSpec,
    build_clipn,
    import_original_checkpoint,
    load_checkpoint,
    save_base_clip,
    save_checkpoint,
)

__all__ = [
    "BatchScorer", "BatchScores", "CLIPN", "CheckpointKeyError", "ClassHeads", "ClassListError",
    "ClipnError", "ClipnLoss", "DecodeError", "DecodeErrorKind", "DecodedImage", "ModelConfigError",
    "ModelSpec", "NoTextTower", "OODMetrics", "SCORES", "ScoreInputs", "ScoreResult", "StorageError",
    "TemplateError", "WeightsError", "build_class_heads", "build_clipn", "class_set_hash",
    "clipn_loss", "compute_scores", "decode_image", "fpr_at_tpr", "get_tokenizer", "image_transform",
    "import_original_checkpoint", "itbo_loss", "load_checkpoint", "load_templates", "ood_metrics",
    "save_base_clip", "save_checkpoint", "top1_accuracy", "tso_loss", "validate_class_names",
]

"""What every job that scores resolves first, the same way: classes, templates, model, heads, logit scale.

The nightly job (:mod:`jobs.score`), ``clipn evaluate`` and ``clipn calibrate`` all start
here, so a setup that was evaluated or calibrated is exactly the one the nightly job runs.
Everything that can be wrong (class file, templates, weights) raises a
:class:`~clipn_core.ClipnError` naming it, before any image is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import clipn_core as cc
from clipn_core.storage import Storage
from schemas.score_config import ClassesConfig, ModelConfig, ScoringOptions


@dataclass(frozen=True)
class ScoringSetup:
    """The resolved setup: class names, templates, heads, the model's identity, preprocessing and logit scale."""

    classes: tuple[str, ...]
    templates: tuple[str, ...]
    heads: cc.ClassHeads
    model_id: str
    preprocess_cfg: dict
    logit_scale: float  # the model's own (logit_scale: model) or the configured number


def load_model(model_cfg: ModelConfig, storage: Storage, cache_dir: str | None) -> tuple[cc.CLIPN, str]:
    """(CLIPN in eval mode, model id) from a checkpoint or, for untrained runs, an architecture."""
    if model_cfg.checkpoint:
        model, _, model_id = cc.load_checkpoint(model_cfg.checkpoint, storage.options, cache_dir)
        return model, model_id
    model, spec = cc.build_clipn(model_cfg.architecture, model_cfg.pretrained, storage_options=storage.options,
                                 cache_dir=cache_dir, seed=model_cfg.seed)
    ident = spec.base_weights
    return model, f"untrained:{ident['architecture']}:{ident.get('sha256') or ident.get('pretrained') or 'seed' + str(model_cfg.seed)}"


def prepare(model_cfg: ModelConfig, classes_cfg: ClassesConfig, templates: str | None, options: ScoringOptions,
            storage: Storage) -> tuple[ScoringSetup, cc.CLIPN]:
    """Resolve and validate the setup; returns it and the loaded model (for jobs that score in this process)."""
    classes = cc.load_class_names(classes_cfg.names, classes_cfg.file, storage.options)
    template_set = cc.load_templates(templates, storage.options)
    model, model_id = load_model(model_cfg, storage, options.cache_dir)
    heads = cc.build_class_heads(model, cc.get_tokenizer(model), classes, template_set)
    setup = ScoringSetup(classes, template_set, heads, model_id, model.preprocess_cfg,
                         options.resolve_logit_scale(model.logit_scale))
    return setup, model

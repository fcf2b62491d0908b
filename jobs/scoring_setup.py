"""What every job that scores resolves first, the same way: classes, templates, model, heads, logit scale.

The nightly job (:mod:`jobs.score`), ``clipn evaluate`` and ``clipn calibrate`` all start
here, so a setup that was evaluated or calibrated is exactly the one the nightly job runs.
Everything that can be wrong (class file, templates, weights) raises a
:class:`~clipn_core.ClipnError` naming it, before any image is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import clipn_core as cc
from clipn_core import prompt_tokens
from clipn_core.errors import redact_uri
from clipn_core.heads import class_set_prompts, heads_cache_key, load_heads, save_heads
from clipn_core.lake_bank import LakeBank, bank_from_bytes
from clipn_core.model import text_embed_dim
from clipn_core.negatives import (
    NegativeLabels,
    lexicon_hash,
    load_lexicon,
    load_negatives,
    mine_negatives,
    save_negatives,
)
from clipn_core.storage import DEFAULT_CACHE_DIR, Storage
from schemas.score_config import ClassesConfig, ModelConfig, NegativesConfig, ScoringOptions

log = logging.getLogger("clipn.setup")


@dataclass(frozen=True)
class ScoringSetup:
    """The resolved setup: class names, templates, heads, the model's identity, preprocessing and logit scale."""

    classes: tuple[str, ...]
    templates: tuple[str, ...]
    heads: cc.ClassHeads
    model_id: str
    preprocess_cfg: dict
    logit_scale: float  # the model's own (logit_scale: model) or the configured number
    negatives: NegativeLabels | None = None
    negative_groups: int = 100
    bank: LakeBank | None = None

    @property
    def negatives_id(self) -> str | None:
        return self.negatives.id if self.negatives is not None else None

    @property
    def bank_id(self) -> str | None:
        return self.bank.id if self.bank is not None and not self.bank.empty else None

    def scorer_kwargs(self) -> dict:
        """The negative labels and lake bank as :class:`~clipn_core.BatchScorer` keyword arguments."""
        return {"negatives": self.negatives.yes if self.negatives is not None else None,
                "negative_groups": self.negative_groups,
                "bank": (self.bank.id_proxies, self.bank.ood_proxies) if self.bank is not None else None}


def load_model(model_cfg: ModelConfig, storage: Storage, cache_dir: str | None) -> tuple[cc.CLIPN, str]:
    """(CLIPN in eval mode, model id) from a checkpoint or, for untrained runs, an architecture."""
    if model_cfg.checkpoint:
        model, _, model_id = cc.load_checkpoint(model_cfg.checkpoint, storage.options, cache_dir)
        return model, model_id
    model, spec = cc.build_clipn(model_cfg.architecture, model_cfg.pretrained, storage_options=storage.options,
                                 cache_dir=cache_dir, seed=model_cfg.seed, pretrained_config=model_cfg.pretrained_config)
    ident = spec.base_weights
    weights = ident.get("sha256") or ident.get("pretrained") or "seed" + str(model_cfg.seed)
    # the structure (activation, preprocessing) is part of the id: the same weights built another way are another model
    return model, f"untrained:{ident['architecture']}:{weights}:{spec.structure_digest()[:12]}"


def cache_path(cache_dir: str | None, kind: str, key: str) -> Path:
    """The local cache file of a ``kind`` (``heads``, ``negatives``) entry under ``key`` (a JSON string)."""
    return Path(cache_dir or DEFAULT_CACHE_DIR) / kind / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


@contextlib.contextmanager
def _warnings_of(logger: str):
    """The messages of the warnings ``logger`` gives inside the block (they are logged as usual too)."""
    found: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            found.append(record.getMessage())

    handler = Keep(logging.WARNING)
    logging.getLogger(logger).addHandler(handler)
    try:
        yield found
    finally:
        logging.getLogger(logger).removeHandler(handler)


def class_heads(model: cc.CLIPN, model_id: str, classes: tuple[str, ...], templates: tuple[str, ...],
                prompt_names: tuple[str, ...] | None, cache_dir: str | None) -> cc.ClassHeads:
    """The class heads of this model, class set and templates, from the local cache when it holds them (key:
    :func:`~clipn_core.heads.heads_cache_key`), else encoded here and cached in ``<cache_dir>/heads/``. An
    entry the cache refuses (stale, truncated, another shape: :class:`~clipn_core.CacheError`) is encoded
    again and replaced, with a warning naming it."""
    key = heads_cache_key(model_id, classes, templates, prompt_names, device=next(model.parameters()).device)
    path = cache_path(cache_dir, "heads", key)
    if path.exists():
        try:
            heads = load_heads(path, key, classes, templates, text_embed_dim(model))
            log.info("class heads for %d classes x %d templates loaded from %s", len(classes), len(templates), path)
            return heads
        except cc.CacheError as e:
            log.warning("%s; encoding the heads again", e)
    t0 = time.perf_counter()
    with _warnings_of(prompt_tokens.log.name) as warned:  # kept with the entry: every run using it warns again
        heads = cc.build_class_heads(model, cc.get_tokenizer(model), classes, templates, prompt_names=prompt_names)
    save_heads(heads, path, key, warned)
    log.info("encoded class heads for %d classes x %d templates in %.1f s, cached in %s", len(classes),
             len(templates), time.perf_counter() - t0, path)
    return heads


def negative_labels(model: cc.CLIPN, model_id: str, heads: cc.ClassHeads, cfg: NegativesConfig, storage: Storage,
                    cache_dir: str | None) -> NegativeLabels:
    """The mined negative labels for this model and class set, from the local cache when it holds them (key:
    model id, class set, lexicon and every mining setting), else mined here and cached."""
    lexicon = load_lexicon(cfg.lexicon, storage.options)
    key = json.dumps({"model": model_id, "class_set": heads.class_set_hash, "lexicon": lexicon_hash(lexicon),
                      "count": cfg.count, "bound": cfg.synonym_bound, "template": cfg.template}, sort_keys=True)
    path = cache_path(cache_dir, "negatives", key)
    if path.exists():
        return load_negatives(path)
    t0 = time.perf_counter()
    negatives = mine_negatives(model, cc.get_tokenizer(model), heads, lexicon, cfg.count, cfg.synonym_bound,
                               template=cfg.template)
    save_negatives(negatives, path)
    log.info("mined %d negative labels from %d lexicon words in %.1f s (%d near-synonyms dropped), cached in %s",
             len(negatives), len(lexicon), time.perf_counter() - t0, negatives.settings["dropped_as_synonyms"], path)
    return negatives


def prepare(model_cfg: ModelConfig, classes_cfg: ClassesConfig, templates: str | None, options: ScoringOptions,
            storage: Storage, negatives: NegativesConfig | None = None) -> tuple[ScoringSetup, cc.CLIPN]:
    """Resolve and validate the setup; returns it and the loaded model (for jobs that score in this process)."""
    classes = cc.load_class_names(classes_cfg.names, classes_cfg.file, storage.options, classes_cfg.set)
    template_set = cc.load_templates(templates, storage.options)
    model, model_id = load_model(model_cfg, storage, options.cache_dir)
    heads = class_heads(model, model_id, classes, template_set, class_set_prompts(classes_cfg.set), options.cache_dir)
    mined = (negative_labels(model, model_id, heads, negatives, storage, options.cache_dir)
             if negatives is not None and negatives.enabled else None)
    bank = load_bank(negatives.bank, storage) if negatives is not None and negatives.bank else None
    setup = ScoringSetup(classes, template_set, heads, model_id, model.preprocess_cfg,
                         options.resolve_logit_scale(model.logit_scale), mined,
                         negatives.groups if negatives is not None else 100, bank)
    return setup, model


def load_bank(uri: str, storage: Storage) -> LakeBank:
    """The lake bank at ``uri``; :class:`~clipn_core.InputError` naming it when it cannot be read."""
    try:
        return bank_from_bytes(storage.read_bytes(uri))
    except cc.StorageError as e:
        raise cc.InputError(f"negatives.bank: {e}") from e
    except Exception as e:  # noqa: BLE001 - not a bank file: one clear line
        raise cc.InputError(f"negatives.bank {redact_uri(uri)} is not a lake bank: {type(e).__name__}: {e}") from e

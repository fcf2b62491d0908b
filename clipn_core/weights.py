"""Weights: base CLIP resolution, CLIPN checkpoints, and import of original CLIPN checkpoints.

Base CLIP weights resolve through open_clip (a pretrained tag such as ``openai``, an
``hf-hub:org/repo`` or ``local-dir:`` architecture, a local file) or from an object
storage URI (``s3://...``), downloaded once into a local cache.

A CLIPN checkpoint is ``<name>.safetensors`` (the full state dict: frozen CLIP + no
tower) plus the JSON sidecar ``<name>.json`` (architecture, open_clip model config,
preprocessing config, number of prompts, base-weights identity, sha256 of the weights
file, format version). The sidecar is written last, so its presence means the weights
are complete; its sha256 is checked on load and doubles as the model id.

Every load is strict: missing, unexpected or mis-shaped keys raise
:class:`~clipn_core.errors.CheckpointKeyError` naming them. Pickles are never trusted:
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import pickle
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import safetensors.torch
import torch
from safetensors import SafetensorError

from . import pretrained_config as pcfg
from .architectures import model_config, resolve_architecture
from .errors import CheckpointKeyError, ModelConfigError, StorageError, WeightsError, redact_uri
from .model import CLIPN, DEFAULT_NUM_PROMPTS
from .storage import filesystem, is_remote, local_copy, read_bytes, sha256_file, write_bytes

CHECKPOINT_FORMAT = "clipn-lake/checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
_SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")
_STRUCTURE_KEY = "clipn.structure_sha256"


@dataclass
class ModelSpec:
    """Everything needed to rebuild a CLIPN model without its weights (the sidecar's content)."""

    architecture: str
    model_cfg: dict
    preprocess_cfg: dict
    num_prompts: int = DEFAULT_NUM_PROMPTS
    base_weights: dict = field(default_factory=dict)
    logit_scale: float | None = None  # the base CLIP's learned logit_scale.exp(), as saved (None: not recorded)

    def to_json_dict(self) -> dict:
        d = asdict(self)
        d["preprocess_cfg"] = _jsonable(d["preprocess_cfg"])
        return d

    @classmethod
    def from_sidecar(cls, meta: dict) -> ModelSpec:
        """The spec a sidecar (:func:`read_sidecar`) records."""
        return cls(architecture=meta["architecture"], model_cfg=meta["model_cfg"], preprocess_cfg=meta["preprocess_cfg"],
                   num_prompts=int(meta["num_prompts"]), base_weights=meta.get("base_weights", {}),
                   logit_scale=meta.get("logit_scale"))

    def structure_digest(self) -> str:
        """sha256 of what decides the model's function besides its weights (architecture, model and
        preprocessing config, K), stored in the weights file so the model id changes with it."""
        d = self.to_json_dict()
        blob = json.dumps({k: d[k] for k in ("architecture", "model_cfg", "preprocess_cfg", "num_prompts")},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple | list):
        return [_jsonable(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return obj


def sidecar_uri(weights_uri: str) -> str:
    """``x.safetensors`` -> ``x.json``; any other suffix is an error."""
    if not str(weights_uri).endswith(".safetensors"):
        raise WeightsError(f"a CLIPN checkpoint URI must end with .safetensors: {redact_uri(weights_uri)}")
    return str(weights_uri)[: -len(".safetensors")] + ".json"


def _resolve_model_cfg(architecture: str, cache_dir: str | None) -> dict:
    if architecture.startswith("local-dir:"):
        cfg_path = Path(architecture[len("local-dir:"):]) / "open_clip_config.json"
        try:
            return json.loads(cfg_path.read_text())["model_cfg"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise ModelConfigError(f"cannot read model_cfg from {cfg_path}: {e}") from e
    if architecture.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        repo = architecture[len("hf-hub:"):]
        try:
            path = hf_hub_download(repo, "open_clip_config.json", cache_dir=cache_dir)
            return json.loads(Path(path).read_text())["model_cfg"]
        except Exception as e:  # noqa: BLE001 - any hub failure becomes a typed error naming the repo
            raise ModelConfigError(f"cannot resolve {architecture}: {type(e).__name__}: {e}") from e
    return copy.deepcopy(model_config(architecture))


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _quiet_random_init(active: bool):
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" (logged on the root logger)
    while building a CLIP on purpose without weights: ours are loaded right after, or a seed is wanted."""
    if not active:
        yield
        return
    root, quiet = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def create_base_clip(
    architecture: str,
    pretrained: str | None = None,
    storage_options: dict | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    pretrained_config: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[open_clip.CLIP, dict, dict]:
    """Build the base CLIP as its weights were trained, and resolve its weights.

    ``pretrained``: None (random init, seeded so every process builds the same model),
    an open_clip tag, a local file, or an object-storage URI. Ignored (must be None)
    for ``hf-hub:`` / ``local-dir:`` architectures, which carry their own weights.
    ``architecture``: a registered name, ``hf-hub:``/``local-dir:``, or an open_clip model config file (local or
    object-storage URI ending in ``.json``), registered in this process first
    (:func:`clipn_core.architectures.resolve_architecture`); the identity records it as given.
    ``pretrained_config``: the open_clip tag whose configuration a weights file (or a random
    init) follows, or ``plain`` (:mod:`clipn_core.pretrained_config`); a tag as ``pretrained``
    names its own. The configuration's activation (QuickGELU or GELU) and preprocessing are
    what the model is built with, also where open_clip's own factory would only warn.
    ``device``: where the model is built (``meta`` builds the structure without memory).

    Returns (model in eval mode, open_clip model config as built, base-weights identity dict
    with ``pretrained_config``). Raises :class:`WeightsError` / :class:`ModelConfigError`
    naming the architecture, weights or tag at fault.
    """
    if architecture.startswith(_SCHEMA_PREFIXES) and pretrained:
        raise WeightsError(f"{architecture} carries its weights; do not also pass pretrained={pretrained!r}")
    given, architecture = redact_uri(architecture), resolve_architecture(architecture, storage_options, cache_dir)
    is_file = bool(pretrained) and (is_remote(pretrained) or Path(pretrained).exists())
    if architecture.startswith(_SCHEMA_PREFIXES):  # refused before anything is fetched from the hub
        pcfg.resolve(architecture, pretrained, pretrained_config, pretrained_is_tag=False)
    model_cfg = _resolve_model_cfg(architecture, cache_dir)
    check_tokenizer(architecture, model_cfg)
    config = pcfg.resolve(architecture, pretrained, pretrained_config, pretrained_is_tag=bool(pretrained) and not is_file)
    identity: dict[str, Any] = {"architecture": given, "pretrained": None, "sha256": None}
    open_clip_pretrained = None
    if pretrained:
        identity["pretrained"] = redact_uri(pretrained)
        if is_file:
            try:
                local = local_copy(pretrained, storage_options, cache_dir)
            except StorageError as e:
                raise WeightsError(f"base weights for {architecture}: {e}") from e
            identity["sha256"] = sha256_file(local)
            open_clip_pretrained = str(local)
        else:
            open_clip_pretrained = pretrained  # an open_clip tag
    if not architecture.startswith(_SCHEMA_PREFIXES):
        identity["pretrained_config"] = config.name
    if config.quick_gelu:
        model_cfg["quick_gelu"] = True
    try:
        # built on ``device`` directly (open_clip builds on the CPU, then moves the model)
        with torch.random.fork_rng(devices=[]), _quiet_random_init(open_clip_pretrained is None), \
                warnings.catch_warnings(), torch.device(device):
            # open_clip warns of a QuickGELU mismatch between the tag and the plain config: resolved above
            warnings.filterwarnings("ignore", message="QuickGELU mismatch", category=UserWarning)
            torch.manual_seed(seed)
            clip = open_clip.create_model(
                architecture, pretrained=open_clip_pretrained, cache_dir=cache_dir, weights_only=True,
                force_quick_gelu=config.quick_gelu, force_preprocess_cfg=config.preprocess or None, device=device,
            )
    except Exception as e:  # noqa: BLE001 - open_clip raises RuntimeError/ValueError/OSError alike
        raise WeightsError(
            f"cannot build {given} with pretrained={identity['pretrained']!r}: {type(e).__name__}: {e}"
        ) from e
    if pretrained is None and not architecture.startswith(_SCHEMA_PREFIXES):
        identity["seed"] = seed
    return clip.eval(), model_cfg, identity


def build_clipn(
    architecture: str,
    pretrained: str | None = None,
    num_prompts: int = DEFAULT_NUM_PROMPTS,
    storage_options: dict | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    pretrained_config: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[CLIPN, ModelSpec]:
    """A fresh CLIPN (no tower copied from the text tower, zero prompts) over a base CLIP built by
    :func:`create_base_clip` (same arguments, same errors)."""
    clip, model_cfg, identity = create_base_clip(architecture, pretrained, storage_options, cache_dir, seed,
                                                 pretrained_config, device)
    model = CLIPN(clip, num_prompts)
    spec = ModelSpec(identity["architecture"], model_cfg, model.preprocess_cfg, num_prompts, identity)
    return model.eval(), spec


def check_tokenizer(architecture: str, model_cfg: dict) -> None:
    """Refuse text towers whose tokenizer is not open_clip's CLIP BPE (CLIPA's BERT, MetaCLIP 2's XLM-V, SigLIP's):
    class names are tokenized with :func:`~clipn_core.model.get_tokenizer`, and another vocabulary's ids would index
    past the embedding or pool at the wrong position. Raises :class:`ModelConfigError`."""
    name = model_cfg.get("text_cfg", {}).get("hf_tokenizer_name")
    if name:
        raise ModelConfigError(f"{architecture}: its text tower uses the {name} tokenizer; CLIPN here tokenizes with "
                               "open_clip's CLIP BPE, so only text towers trained with it are supported")


def model_from_spec(spec: ModelSpec, device: str | torch.device = "cpu") -> CLIPN:
    """The CLIPN a sidecar describes, with fresh weights (load a state dict into it): built from its
    recorded open_clip model config and preprocessing, never from today's architecture registry.
    ``device``: where to build it (``meta`` for the structure alone)."""
    cfg = copy.deepcopy(spec.model_cfg)
    if cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {}):
        raise ModelConfigError(f"{spec.architecture}: CLIPN needs the standard CLIP text tower")
    check_tokenizer(spec.architecture, cfg)
    try:
        with torch.device(device):
            clip = open_clip.CLIP(**cfg)
    except TypeError as e:
        raise ModelConfigError(f"cannot build {spec.architecture} from its model_cfg: {e}") from e
    open_clip.set_model_preprocess_cfg(clip, dict(spec.preprocess_cfg))
    return CLIPN(clip, spec.num_prompts)


def load_state_dict_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` only if keys and shapes match exactly; else raise naming them."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointKeyError(redact_uri(source), missing, unexpected, mismatched)
    module.load_state_dict(state, strict=True)


def save_checkpoint(model: CLIPN, spec: ModelSpec, uri: str, storage_options: dict | None = None) -> str:
    """Write ``uri`` (.safetensors) then its JSON sidecar; return the weights' sha256 (the model id).

    The sidecar records the base CLIP's learned logit scale (``spec.logit_scale`` is set from ``model``);
    the weights file records the digest of the spec's structure (:meth:`ModelSpec.structure_digest`)."""
    side = sidecar_uri(uri)
    spec.logit_scale = model.logit_scale
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # the structure's digest inside the weights file: the same weights built another way (QuickGELU
    # instead of GELU, other preprocessing) are another model, with another id
    data = safetensors.torch.save(state, metadata={_STRUCTURE_KEY: spec.structure_digest()})
    digest = hashlib.sha256(data).hexdigest()
    sidecar = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "sha256": digest,
        **spec.to_json_dict(),
    }
    write_bytes(uri, data, storage_options)
    write_bytes(side, json.dumps(sidecar, indent=2, sort_keys=True).encode(), storage_options)
    return digest


def save_base_clip(clip: torch.nn.Module, uri: str, storage_options: dict | None = None) -> str:
    """Write a whole open_clip CLIP's state dict to ``uri`` (.safetensors); return its sha256.

    The file is what open_clip loads as ``pretrained=<file>`` for the same architecture,
    so it serves as ``model.pretrained`` of the CLIPN training and scoring jobs (the
    ``clip`` training stage writes it).
    """
    if not str(uri).endswith(".safetensors"):
        raise WeightsError(f"base CLIP weights URI must end with .safetensors: {redact_uri(uri)}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in clip.state_dict().items()}
    data = safetensors.torch.save(state)
    write_bytes(uri, data, storage_options)
    return hashlib.sha256(data).hexdigest()


_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on its JSON header


def _safetensors_header(uri: str, storage_options: dict | None) -> dict | None:
    """The JSON header of a .safetensors file (tensor names -> dtype/shape/offsets, ``__metadata__``), read with
    two ranged reads (not the weights: a base ViT-B/16 is 600 MB); None when it cannot be read as one."""
    try:
        fs, path = filesystem(uri, storage_options)
        head = fs.cat_file(path, start=0, end=8)
        size = int.from_bytes(head, "little")
        if len(head) != 8 or not 0 < size <= _MAX_HEADER_BYTES:
            return None
        header = json.loads(fs.cat_file(path, start=8, end=8 + size))
    except Exception:  # noqa: BLE001 - only a better message is at stake: the caller raises either way
        return None
    return header if isinstance(header, dict) else None


def _missing_sidecar(uri: str, field: str, cause: StorageError, storage_options: dict | None) -> WeightsError:
    """The error for checkpoint ``uri`` (config field ``field``) without a sidecar: what its weights file is, when
    its header says (a CLIPN checkpoint, or base CLIP weights as :func:`save_base_clip` writes them), and how to
    use it."""
    side, where = redact_uri(sidecar_uri(uri)), redact_uri(uri)
    header = _safetensors_header(uri, storage_options)
    if header is None:
        return WeightsError(f"{field}: checkpoint sidecar missing or unreadable: {cause}")
    keys = set(header) - {"__metadata__"}
    if _STRUCTURE_KEY in (header.get("__metadata__") or {}) or any(k.startswith("no_tower.") for k in keys):
        return WeightsError(f"{field}: {where} is a CLIPN checkpoint without its sidecar {side} (written last: the "
                            "save did not finish, or the sidecar was not copied along); copy the sidecar beside it")
    if {"logit_scale", "text_projection"} <= keys and any(k.startswith("visual.") for k in keys):
        return WeightsError(
            f"{field}: {where} is base CLIP weights (as `clipn train --stage clip` or `--stage lit` writes them), not "
            f"a CLIPN checkpoint (no sidecar {side}): train a no tower on it with `clipn train --stage clipn "
            f"--model.pretrained {where} --model.pretrained_config plain`, or score it with an untrained no tower "
            f"by giving it as model.pretrained, with model.architecture (the one it was trained as) and "
            f"model.pretrained_config: plain, instead of {field}")
    return WeightsError(f"{field}: checkpoint sidecar missing or unreadable: {cause}")


def read_sidecar(uri: str, storage_options: dict | None = None, field: str = "model.checkpoint") -> dict:
    """The validated JSON sidecar of checkpoint ``uri``. Raises :class:`WeightsError`; a missing sidecar's names
    ``field`` (the config field holding ``uri``) and, when the weights file is base CLIP weights, how to pass
    them instead."""
    side = sidecar_uri(uri)
    try:
        meta = json.loads(read_bytes(side, storage_options))
    except StorageError as e:
        raise _missing_sidecar(uri, field, e, storage_options) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"checkpoint sidecar {redact_uri(side)} is not valid JSON: {e}") from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{redact_uri(side)} is not a {CHECKPOINT_FORMAT} sidecar (format={meta.get('format')!r})")
    if meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise WeightsError(
            f"{redact_uri(side)}: format_version {meta.get('format_version')!r} is not supported "
            f"(this clipn-lake reads {CHECKPOINT_FORMAT_VERSION})"
        )
    missing = [k for k in ("sha256", "architecture", "model_cfg", "preprocess_cfg", "num_prompts") if k not in meta]
    if missing:
        raise WeightsError(f"{redact_uri(side)} lacks field(s) {missing}")
    return meta


def check_base_config(spec: ModelSpec, uri: str) -> None:
    """Refuse a checkpoint built with GELU whose recorded base weights were trained with QuickGELU.

    Checkpoints written before base CLIPs were built from their pretrained configuration ran
    OpenAI-style weights with the wrong activation: every feature is shifted and nothing fails.
    Raises :class:`WeightsError` (one line naming the checkpoint and the re-save command) where the
    sidecar names a QuickGELU tag; where its base weights were a file, which names none, logs one
    warning per process when the architecture has QuickGELU-trained tags.
    """
    config = pcfg.recorded(spec.base_weights, spec.architecture)
    if config is None and "pretrained_config" not in spec.base_weights and spec.base_weights.get("sha256") \
            and not spec.model_cfg.get("quick_gelu", False):
        pcfg.warn_unrecorded(spec.base_weights.get("architecture") or spec.architecture, redact_uri(uri))
    if config is not None and config.quick_gelu and not spec.model_cfg.get("quick_gelu", False):
        arch = spec.base_weights.get("architecture") or spec.architecture
        raise WeightsError(
            f"checkpoint {redact_uri(uri)} runs GELU on base weights {arch}/{config.tag}, which were trained with "
            f"QuickGELU (every feature is shifted): re-save it with `clipn upgrade-checkpoint --checkpoint "
            f"{redact_uri(uri)} --output <new>.safetensors` (a new model id; a no tower trained on the GELU model "
            "should be retrained, and calibrations redone)")


def read_state_dict(uri: str, field: str, storage_options: dict | None = None,
                    cache_dir: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256 of the file) of a local or object-storage weights file: ``.safetensors``, or a torch
    file (``.pt``/``.pth``/``.bin``) read with ``weights_only=True`` (a plain dict of tensors, or one under
    ``state_dict``). Raises :class:`WeightsError` naming ``field`` and the URI."""
    try:
        local = local_copy(uri, storage_options, cache_dir)
    except StorageError as e:
        raise WeightsError(f"{field}: {e}") from e
    try:
        if Path(local).suffix == ".safetensors":
            state = safetensors.torch.load_file(str(local), device="cpu")
        else:
            state = torch.load(str(local), map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, OSError, RuntimeError, EOFError, ValueError) as e:
        raise WeightsError(f"{field}: {redact_uri(uri)} is not a readable state dict "
                           f"(.safetensors, or a torch file loaded with weights_only=True): {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{field}: {redact_uri(uri)} holds no state dict of tensors")
    return state, sha256_file(local)


def _read_weights(uri: str, meta: dict, storage_options: dict | None, cache_dir: str | None
                  ) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """(state dict, sha256, structure digest stored in the file or None) of a checkpoint's weights file,
    checked against its sidecar's sha256."""
    try:
        local = local_copy(uri, storage_options, cache_dir)
    except StorageError as e:
        raise WeightsError(f"checkpoint weights missing or unreadable: {e}") from e
    digest = sha256_file(local)
    if digest != meta["sha256"]:
        raise WeightsError(
            f"checkpoint {redact_uri(uri)} is corrupt: sha256 {digest[:16]}... does not match "
            f"its sidecar's {meta['sha256'][:16]}..."
        )
    try:
        state = safetensors.torch.load_file(str(local), device="cpu")
        with safetensors.safe_open(str(local), framework="pt") as f:
            structure = (f.metadata() or {}).get(_STRUCTURE_KEY)
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"checkpoint {redact_uri(uri)} is not a readable safetensors file: {e}") from e
    return state, digest, structure


def load_checkpoint(
    uri: str,
    storage_options: dict | None = None,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    field: str = "model.checkpoint",
) -> tuple[CLIPN, ModelSpec, str]:
    """Load a CLIPN checkpoint from a local path or URI; returns (model in eval mode, spec, model id).

    ``field`` names where ``uri`` came from in the errors of a missing sidecar (:func:`read_sidecar`).

    The weights file's sha256 must equal the sidecar's (else the file is corrupt or was
    replaced without its sidecar), the structure digest it records must match the sidecar's
    spec, keys and shapes must match exactly, and the base CLIP must be built as its recorded
    base weights were trained (:func:`check_base_config`). Raises :class:`WeightsError`.
    """
    meta = read_sidecar(uri, storage_options, field)
    spec = ModelSpec.from_sidecar(meta)
    check_base_config(spec, uri)
    state, digest, structure = _read_weights(uri, meta, storage_options, cache_dir)
    if structure is not None and structure != spec.structure_digest():
        raise WeightsError(f"checkpoint {redact_uri(uri)}: its sidecar describes another model than the one its "
                           "weights were saved as (model or preprocessing config edited after saving)")
    model = model_from_spec(spec)
    load_state_dict_strict(model, state, uri)
    return model.to(device).eval(), spec, digest


def upgrade_checkpoint(uri: str, output: str, pretrained_config: str | None = None,
                       storage_options: dict | None = None, cache_dir: str | None = None) -> tuple[str, ModelSpec]:
    """Re-save checkpoint ``uri`` as ``output`` built from its base weights' pretrained configuration.

    The configuration is ``pretrained_config`` (a tag of the base architecture, for checkpoints whose
    base weights were a file) or the one the sidecar records. Its activation (QuickGELU) and
    preprocessing replace the recorded ones; the weights are the same tensors. Returns (the new
    model id, the new spec). Raises :class:`WeightsError` / :class:`ModelConfigError`.
    """
    meta = read_sidecar(uri, storage_options, field="checkpoint")
    spec = ModelSpec.from_sidecar(meta)
    arch = spec.base_weights.get("architecture") or spec.architecture
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
    if pretrained_config == pcfg.PLAIN:
        raise WeightsError(f"pretrained_config: {pcfg.PLAIN!r} names no tag to upgrade {redact_uri(uri)} to; name "
                           f"the tag its base weights were trained as (tags of {arch}: {tags})")
    config = (pcfg.tag_config(arch, pretrained_config) if pretrained_config is not None
              else pcfg.recorded(spec.base_weights, spec.architecture))
    if config is None:
        recorded = spec.base_weights.get("pretrained_config")
        raise WeightsError(f"{redact_uri(uri)}: its base weights record "
                           f"{'the configuration ' + repr(recorded) if recorded else 'no pretrained configuration'}; "
                           f"name the tag they were trained as with pretrained_config (tags of {arch}: {tags})")
    if (spec.model_cfg.get("quick_gelu", False) == config.quick_gelu
            and all(spec.preprocess_cfg.get(k) == _jsonable(v) for k, v in config.preprocess.items())
            and spec.base_weights.get("pretrained_config") == config.name):
        raise WeightsError(f"{redact_uri(uri)} is already built as {arch}/{config.name}: nothing to upgrade")
    state, _, _ = _read_weights(uri, meta, storage_options, cache_dir)
    if config.quick_gelu:
        spec.model_cfg = {**spec.model_cfg, "quick_gelu": True}
    spec.preprocess_cfg = {**spec.preprocess_cfg, **config.preprocess}
    spec.base_weights = {**spec.base_weights, "pretrained_config": config.name}
    model = model_from_spec(spec)
    load_state_dict_strict(model, state, uri)
    return save_checkpoint(model.eval(), spec, output, storage_options), spec


# Original CLIPN (xmed-lab/CLIPN) names of the no tower -> ours. Everything else is the CLIP.
_ORIGINAL_NO_TOWER = (
    ("transformer_no.", "no_tower.transformer."),
    ("token_embedding_no.", "no_tower.token_embedding."),
    ("positional_embedding_no", "no_tower.positional_embedding"),
    ("ln_final_no.", "no_tower.ln_final."),
    ("text_projection_no", "no_tower.text_projection"),
    ("prompt_no", "no_tower.prompts"),
)


def original_key_to_ours(key: str) -> str:
    """Map one key of an original CLIPN state dict (``module.`` already stripped) to ours."""
    for old, new in _ORIGINAL_NO_TOWER:
        if key.startswith(old):
            return new + key[len(old):]
    return "clip." + key


ORIGINAL_BASE = ("ViT-B-16", "laion2b_s34b_b88k")  # what the released CLIPN weights were trained from (its run.sh)


def import_original_checkpoint(
    uri: str,
    architecture: str = ORIGINAL_BASE[0],
    storage_options: dict | None = None,
    cache_dir: str | None = None,
    pretrained_config: str | None = ORIGINAL_BASE[1],
) -> tuple[CLIPN, ModelSpec]:
    """Import a checkpoint written by the original CLIPN code (``torch.save`` of a dict with ``state_dict``).

    The original code trains its no tower over open_clip's ``ViT-B-16`` with the
    ``laion2b_s34b_b88k`` weights, a GELU model: ``pretrained_config`` (default that tag; ``plain``
    for the architecture's own config) is the configuration the base CLIP is built with, and is
    recorded in the sidecar's ``base_weights``. Keys may carry DDP's ``module.`` prefix. The number
    of prompts is read from ``prompt_no`` [K, context, width]. Loading is strict and never
    unpickles objects. Raises :class:`WeightsError` / :class:`CheckpointKeyError`.
    """
    state, digest = read_state_dict(uri, "original CLIPN checkpoint", storage_options, cache_dir)
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    if "prompt_no" not in state:
        raise CheckpointKeyError(redact_uri(uri), missing=["prompt_no"],
                                 note="not an original CLIPN checkpoint: it has no no-prompts tensor")
    ours = {original_key_to_ours(k): v for k, v in state.items()}
    model, spec = build_clipn(architecture, None, int(state["prompt_no"].shape[0]), cache_dir=cache_dir,
                              pretrained_config=pretrained_config or pcfg.PLAIN)
    spec.base_weights = {"architecture": architecture, "pretrained": redact_uri(uri), "sha256": digest,
                         "pretrained_config": spec.base_weights["pretrained_config"]}
    load_state_dict_strict(model, ours, uri)
    return model.eval(), spec

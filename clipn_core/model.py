"""The CLIPN model: a frozen open_clip CLIP plus a trainable "no" text tower.

The no tower is a copy of the CLIP text tower (token embedding, positional embedding,
transformer, final LayerNorm, projection) initialised from it, plus K learnable no
prompts ``P`` [K, context_length, width] that start at zero and are added to token +
positional embeddings at every position. In training mode each sample adds one of the
K prompts or their mean (K + 1 uniform choices); in eval mode the mean.
"""

from __future__ import annotations

import copy

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from . import architectures  # noqa: F401  (registers model_configs/*.json with open_clip)
from .errors import ModelConfigError

DEFAULT_NUM_PROMPTS = 16
MAX_LOGIT_SCALE = 100.0


def check_standard_text_tower(clip: nn.Module) -> None:
    """Raise :class:`ModelConfigError` unless ``clip`` is an open_clip CLIP with the standard text tower."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if not isinstance(clip, open_clip.CLIP) or any(not hasattr(clip, a) for a in needed):
        raise ModelConfigError(
            f"CLIPN needs an open_clip CLIP with the standard text tower; got {type(clip).__name__} "
            "(CustomTextCLIP / HF text towers / CoCa are not supported)"
        )
    if clip.text_projection is None:  # the no tower copies the projection; text_features applies it
        raise ModelConfigError("CLIPN needs a text tower with a projection; this one has none "
                               "(text_cfg proj_type 'none'): give the architecture a linear text projection")


def text_features(tower: nn.Module, text: torch.Tensor, pool_type: str, eos_id: int | None,
                  prompt: torch.Tensor | None = None) -> torch.Tensor:
    """Unnormalised features [N, embed_dim] of a standard CLIP text tower (``tower`` holds open_clip's
    ``token_embedding``, ``positional_embedding``, ``transformer``, ``attn_mask``, ``ln_final``,
    ``text_projection``) for token ids ``text`` [N, L], L <= context length; ``prompt`` [N or 1, context,
    width] is added to the embeddings (the no tower's).

    L may be shorter than the context: with a causal mask, a position's output depends only on the
    positions before it, so cutting the tokens after the longest text's end leaves the pooled
    end-of-text features unchanged (:func:`trim_tokens`) while the cost falls with L.
    """
    seq = text.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(text).to(cast_dtype) + tower.positional_embedding[:seq].to(cast_dtype)
    if prompt is not None:
        x = x + prompt[:, :seq].to(cast_dtype)
    mask = tower.attn_mask[:seq, :seq] if tower.attn_mask is not None else None
    x = tower.ln_final(tower.transformer(x, attn_mask=mask))
    x = text_global_pool(x, text, pool_type, eos_token_id=eos_id)
    if isinstance(tower.text_projection, nn.Linear):
        return tower.text_projection(x)
    return x @ tower.text_projection


def trim_tokens(text: torch.Tensor, tower: nn.Module, pool_type: str) -> torch.Tensor:
    """``text`` [N, context] cut after the last non-padding token of any row, when that changes no feature
    (a causal mask and end-of-text pooling: ``argmax`` or ``eos``); otherwise unchanged."""
    if tower.attn_mask is None or pool_type not in ("argmax", "eos"):
        return text
    used = int((text != 0).any(dim=0).nonzero().max()) + 1 if text.numel() else text.shape[1]
    return text[:, :used]


def short_text_features(clip: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """L2-normalised features [N, D] of an open_clip CLIP's text tower for token ids [N, context], computed on
    the tokens up to the longest text's end (:func:`trim_tokens`): what ``clip.encode_text(text,
    normalize=True)`` returns, gradients included (in float32 to rounding, ~1e-7; under bf16/fp16 autocast to
    that precision's rounding), at a fraction of the cost for captions much shorter than the context (the text
    tower's cost grows with the tokens it runs on)."""
    pool = clip.text_pool_type
    return F.normalize(text_features(clip, trim_tokens(text, clip, pool), pool, getattr(clip, "text_eos_id", None)),
                       dim=-1)


class NoTextTower(nn.Module):
    """The trainable "no" text tower and its prompts, initialised from a CLIP text tower."""

    def __init__(self, clip: open_clip.CLIP, num_prompts: int = DEFAULT_NUM_PROMPTS):
        super().__init__()
        check_standard_text_tower(clip)
        if num_prompts < 1:
            raise ModelConfigError(f"num_prompts must be >= 1, got {num_prompts}")
        self.token_embedding = copy.deepcopy(clip.token_embedding)
        self.positional_embedding = nn.Parameter(clip.positional_embedding.detach().clone())
        self.transformer = copy.deepcopy(clip.transformer)
        self.ln_final = copy.deepcopy(clip.ln_final)
        proj = clip.text_projection
        self.text_projection = (
            copy.deepcopy(proj) if isinstance(proj, nn.Module) else nn.Parameter(proj.detach().clone())
        )
        # text towers without a causal mask (CLIPA's) have none
        mask = clip.attn_mask
        self.register_buffer("attn_mask", None if mask is None else mask.detach().clone(), persistent=False)
        self.pool_type = clip.text_pool_type
        self.eos_id = getattr(clip, "text_eos_id", None)
        context_length, width = self.positional_embedding.shape
        self.prompts = nn.Parameter(torch.zeros(num_prompts, context_length, width,
                                                device=self.positional_embedding.device))
        for p in self.parameters():
            p.requires_grad_(True)

    @property
    def num_prompts(self) -> int:
        return self.prompts.shape[0]

    def prompt_for_batch(self, batch: int, prompt_idx: torch.Tensor | None = None) -> torch.Tensor:
        """[batch or 1, context, width]: the prompt added to each sample's embeddings.

        ``prompt_idx`` [batch] int64 in ``[0, K]`` picks prompt k (K = their mean) per
        sample, e.g. a deterministic choice from the training job. Without it: a uniform
        random choice in training mode, the mean in eval mode.
        """
        mean = self.prompts.mean(dim=0, keepdim=True)
        if prompt_idx is None and not self.training:
            return mean
        choices = torch.cat([self.prompts, mean], dim=0)
        if prompt_idx is None:
            prompt_idx = torch.randint(0, self.num_prompts + 1, (batch,), device=self.prompts.device)
        return choices[prompt_idx.to(self.prompts.device)]

    def forward(self, text: torch.Tensor, prompt_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised no-text features [N, embed_dim] for token ids ``text`` [N, context], computed on the
        tokens up to the longest text's end (:func:`trim_tokens`: the same features and gradients, to float
        rounding; a prompt's positions after every text's end reach no output either way)."""
        prompt = self.prompt_for_batch(text.shape[0], prompt_idx)
        return text_features(self, trim_tokens(text, self, self.pool_type), self.pool_type, self.eos_id, prompt)


class CLIPN(nn.Module):
    """Frozen CLIP (``self.clip``) + trainable no tower (``self.no_tower``).

    ``train()`` only switches the no tower: the CLIP towers stay in eval mode and never
    require gradients, so dropout / batch-norm statistics of the frozen towers never move.
    """

    def __init__(self, clip: open_clip.CLIP, num_prompts: int = DEFAULT_NUM_PROMPTS):
        super().__init__()
        check_standard_text_tower(clip)
        self.clip = clip
        self.no_tower = NoTextTower(clip, num_prompts)
        self.clip.requires_grad_(False)
        self.clip.eval()

    def train(self, mode: bool = True) -> CLIPN:
        self.training = mode
        self.no_tower.train(mode)
        self.clip.eval()
        return self

    @property
    def context_length(self) -> int:
        return int(self.clip.positional_embedding.shape[0])

    @property
    def preprocess_cfg(self) -> dict:
        """open_clip preprocessing config of the image tower (size, mean, std, interpolation, ...)."""
        return dict(open_clip.get_model_preprocess_cfg(self.clip))

    @property
    def logit_scale(self) -> float:
        """The base CLIP's learned logit scale exp(t), capped at 100 as open_clip's training caps it.

        OpenAI's CLIP stores t = 4.6055 (ln 100 rounded up in fp16): its scale is exactly
        100, the constant of the original CLIPN code. The scores and the training loss use it.
        """
        return min(float(self.clip.logit_scale.exp()), MAX_LOGIT_SCALE)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.no_tower.parameters() if p.requires_grad]

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image features [N, D] for preprocessed images [N, 3, H, W]; L2-normalised by default."""
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Yes-tower text features [N, D] for token ids [N, context]."""
        return self.clip.encode_text(text, normalize=normalize)

    @torch.no_grad()
    def encode_short_texts(self, text: torch.Tensor, tower: str = "yes") -> torch.Tensor:
        """L2-normalised features [N, D] of the ``yes`` or ``no`` tower (the no tower with its mean prompt)
        for token ids [N, context], computed on the tokens up to the longest text's end: the same features
        as :meth:`encode_text` / :meth:`encode_text_no` in eval mode, at a fraction of the cost for short
        texts such as single words (the context is 77 tokens; "a photo of a {word}." uses about 8)."""
        if tower == "yes":
            return short_text_features(self.clip, text)
        no = self.no_tower
        x = text_features(no, trim_tokens(text, no, no.pool_type), no.pool_type, no.eos_id,
                          no.prompts.mean(dim=0, keepdim=True))
        return F.normalize(x, dim=-1)

    def encode_text_no(
        self, text: torch.Tensor, normalize: bool = True, prompt_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """No-tower text features [N, D] for token ids [N, context] (prompt: see ``prompt_for_batch``)."""
        x = self.no_tower(text, prompt_idx)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, text: torch.Tensor, prompt_idx: torch.Tensor | None = None):
        """(image, yes-text, no-text) L2-normalised features [N, D] for a batch of pairs.

        The frozen towers run without autograd: only the no-text features carry a graph.
        """
        with torch.no_grad():
            f, g = self.encode_image(images), short_text_features(self.clip, text)
        return f, g, self.encode_text_no(text, prompt_idx=prompt_idx)


@torch.no_grad()
def encode_texts(model: CLIPN, tokens: torch.Tensor, tower: str, batch_size: int,
                 device: str | torch.device | None = None) -> torch.Tensor:
    """L2-normalised float32 features [N, D] on the CPU of the ``yes`` or ``no`` tower for token ids
    [N, context], ``batch_size`` texts per forward on ``device`` (default: the model's). The one path from
    prompt tokens to text features, shared by class heads and negative labels so both see the same
    features: eval mode for the call (the no tower's mean prompt, no dropout; the mode is restored after),
    tokens trimmed to each batch's longest text (:meth:`CLIPN.encode_short_texts`)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        parts = [model.encode_short_texts(tokens[start:start + batch_size].to(device), tower).float().cpu()
                 for start in range(0, len(tokens), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts) if parts else torch.zeros((0, text_embed_dim(model)))


def text_embed_dim(model: CLIPN) -> int:
    """D, the width of the text features (and of the class heads)."""
    proj = model.clip.text_projection  # a Parameter [width, dim] or, in some open_clip text towers, an nn.Linear
    return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[-1])


def get_tokenizer(model: CLIPN):
    """open_clip's CLIP BPE tokenizer at the model's context length: (list of str) -> int64 [N, context]."""
    return open_clip.SimpleTokenizer(context_length=model.context_length)

"""OOD scores: one registry, one contract.

Every score maps a batch of L2-normalised image features and the class heads to an
**ID score** (higher = more in-distribution) of shape ``[N]``. CTW and ATD also return
their threshold-free OOD decision (``True`` = OOD). The formulas are those of
``shared/design.md``:

* ``logits_yes = s f W_yes^T``, ``logits_no = s f W_no^T`` (``s`` = logit scale, 100)
* ``p = softmax(logits_yes)``; ``p_no[j] = sigmoid(logits_no[j] - logits_yes[j])``
* CTW: ``k = argmax p``; ID score ``1 - p_no[k]``; OOD iff ``p_no[k] > 0.5``
* ATD: ID score ``sum_j (1 - p_no[j]) p[j]``; OOD iff ``1 - ID > max_j (1 - p_no[j]) p[j]``
* MSP ``max p``; MaxLogit ``max logits_yes``; Energy ``logsumexp(logits_yes)``;
  MCM ``max softmax(cos / tau)``

``SCORES`` is the only list of scores in the project: jobs, the CLI, the output schema
and the evaluation report all iterate over it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

import torch

DEFAULT_LOGIT_SCALE = 100.0
DEFAULT_MCM_TEMPERATURE = 1.0


@dataclass(frozen=True)
class ScoreResult:
    """ID score ``[N]`` (higher = more ID) and, for threshold-free rules, ``is_ood [N]``."""

    id_score: torch.Tensor
    is_ood: torch.Tensor | None = None


class ScoreInputs:
    """Logits and probabilities shared by every score, computed once per batch.

    ``image_features`` [N, D] and ``heads_yes`` / ``heads_no`` [C, D] must be
    L2-normalised (``heads_no`` may be None for CLIP-only scores). Everything is
    computed in float32 whatever the input dtype, so scores do not depend on autocast.
    """

    def __init__(
        self,
        image_features: torch.Tensor,
        heads_yes: torch.Tensor,
        heads_no: torch.Tensor | None = None,
        logit_scale: float = DEFAULT_LOGIT_SCALE,
        mcm_temperature: float = DEFAULT_MCM_TEMPERATURE,
    ):
        if image_features.ndim != 2 or heads_yes.ndim != 2:
            raise ValueError(
                f"expected image_features [N, D] and heads [C, D], got "
                f"{tuple(image_features.shape)} and {tuple(heads_yes.shape)}"
            )
        if image_features.shape[1] != heads_yes.shape[1]:
            raise ValueError(
                f"feature width {image_features.shape[1]} != head width {heads_yes.shape[1]}"
            )
        if logit_scale <= 0 or mcm_temperature <= 0:
            raise ValueError("logit_scale and mcm_temperature must be positive")
        self.features = image_features.float()
        self.heads_yes = heads_yes.float().to(self.features.device)
        self.heads_no = None if heads_no is None else heads_no.float().to(self.features.device)
        self.logit_scale = float(logit_scale)
        self.mcm_temperature = float(mcm_temperature)

    @cached_property
    def cos_yes(self) -> torch.Tensor:
        """Cosine similarity to every yes head, [N, C]."""
        return self.features @ self.heads_yes.T

    @cached_property
    def logits_yes(self) -> torch.Tensor:
        return self.logit_scale * self.cos_yes

    @cached_property
    def logits_no(self) -> torch.Tensor:
        if self.heads_no is None:
            raise ValueError("this score needs the no heads (a CLIPN model), none were given")
        return self.logit_scale * (self.features @ self.heads_no.T)

    @cached_property
    def probs(self) -> torch.Tensor:
        """p = softmax over classes of logits_yes, [N, C]."""
        return self.logits_yes.softmax(dim=-1)

    @cached_property
    def p_no(self) -> torch.Tensor:
        """p_no[j] = e^{l_no} / (e^{l_yes} + e^{l_no}), computed stably as a sigmoid, [N, C]."""
        return torch.sigmoid(self.logits_no - self.logits_yes)

    @cached_property
    def predicted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(class index [N] int64, its probability p[k] [N])."""
        prob, idx = self.probs.max(dim=-1)
        return idx, prob


@dataclass(frozen=True)
class Score:
    """One registered score: its name, function and whether it needs the no tower."""

    name: str
    fn: Callable[[ScoreInputs], ScoreResult]
    needs_no_tower: bool
    threshold_free: bool
    description: str


SCORES: dict[str, Score] = {}


def register(name: str, *, needs_no_tower: bool, threshold_free: bool = False):
    """Decorator adding a score function to :data:`SCORES` under ``name``."""

    def wrap(fn: Callable[[ScoreInputs], ScoreResult]) -> Callable[[ScoreInputs], ScoreResult]:
        if name in SCORES:
            raise ValueError(f"score {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        SCORES[name] = Score(name, fn, needs_no_tower, threshold_free, doc[0] if doc else "")
        return fn

    return wrap


@register("msp", needs_no_tower=False)
def msp(x: ScoreInputs) -> ScoreResult:
    """Maximum softmax probability max_j p[j]."""
    return ScoreResult(x.probs.max(dim=-1).values)


@register("maxlogit", needs_no_tower=False)
def maxlogit(x: ScoreInputs) -> ScoreResult:
    """Maximum yes logit max_j s cos_j."""
    return ScoreResult(x.logits_yes.max(dim=-1).values)


@register("energy", needs_no_tower=False)
def energy(x: ScoreInputs) -> ScoreResult:
    """Negative free energy logsumexp_j(logits_yes)."""
    return ScoreResult(torch.logsumexp(x.logits_yes, dim=-1))


@register("mcm", needs_no_tower=False)
def mcm(x: ScoreInputs) -> ScoreResult:
    """Maximum concept matching max_j softmax(cos / tau)[j]."""
    return ScoreResult((x.cos_yes / x.mcm_temperature).softmax(dim=-1).max(dim=-1).values)


@register("ctw", needs_no_tower=True, threshold_free=True)
def ctw(x: ScoreInputs) -> ScoreResult:
    """CLIPN competing-to-win: 1 - p_no of the predicted class; OOD iff p_no[k] > 0.5."""
    k, _ = x.predicted
    p_no_k = x.p_no.gather(1, k[:, None]).squeeze(1)
    return ScoreResult(1.0 - p_no_k, p_no_k > 0.5)


@register("atd", needs_no_tower=True, threshold_free=True)
def atd(x: ScoreInputs) -> ScoreResult:
    """CLIPN agreeing-to-differ: sum_j (1 - p_no[j]) p[j]; OOD iff p_ood > max_j of the terms."""
    terms = (1.0 - x.p_no) * x.probs
    id_score = terms.sum(dim=-1)
    return ScoreResult(id_score, (1.0 - id_score) > terms.max(dim=-1).values)


def compute_scores(inputs: ScoreInputs, names: Iterable[str] | None = None) -> dict[str, ScoreResult]:
    """Run the named scores (all registered ones when ``names`` is None) on one batch."""
    selected = list(SCORES) if names is None else list(names)
    unknown = [n for n in selected if n not in SCORES]
    if unknown:
        raise KeyError(f"unknown score(s) {unknown}; registered: {sorted(SCORES)}")
    return {n: SCORES[n].fn(inputs) for n in selected}

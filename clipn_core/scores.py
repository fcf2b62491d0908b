"""OOD scores: one registry, one contract.

Every score maps a batch of L2-normalised image features and the class heads to an
**ID score** (higher = more in-distribution) of shape ``[N]``. CTW and ATD also return
their threshold-free OOD decision (``True`` = OOD). CLIPN's own scores, ``p_no`` and the two
threshold-free inference algorithms CTW (competing-to-win) and ATD (agent-to-discriminate), are
those of the CLIPN paper (H. Wang, Y. Li, H. Yao, X. Li, "CLIPN for Zero-Shot OOD Detection:
Teaching CLIP to Say No", ICCV 2023) and of its
released code (github.com/xmed-lab/CLIPN); the others cite their own papers below. Written out:

* ``logits_yes = s f W_yes^T``, ``logits_no = s f W_no^T`` with ``f`` the image features and
  ``W_yes`` / ``W_no`` the class heads (:mod:`clipn_core.heads`). ``s`` (the logit scale) is
  passed in: :class:`~clipn_core.BatchScorer` and the jobs pass the base CLIP's own learned
  ``logit_scale.exp()`` (:attr:`~clipn_core.CLIPN.logit_scale`, 100 for OpenAI's CLIP, whatever
  the base model learned for others) unless ``runtime.logit_scale`` sets a number;
  :data:`DEFAULT_LOGIT_SCALE` (100) is only :class:`ScoreInputs`' default when it is built by hand
* ``p = softmax(logits_yes)`` over the ID classes; ``p_no[j] = e^l_no / (e^l_yes + e^l_no)``, the
  probability that class ``j``'s "no" text matches, a softmax over [yes, no] per class as in the
  original code; its complement ``1 - p_no[j]`` is computed as
  ``sigmoid(logits_yes[j] - logits_no[j])``, never as ``1 - sigmoid(...)``, which rounds to exactly 0
  once the no logit leads by about 17 in float32, so the most OOD images would all tie
* CTW: ``k = argmax p``; ID score ``1 - p_no[k]``; OOD iff ``p_no[k] > 0.5``
* ATD: ID score ``sum_j (1 - p_no[j]) p[j]``; OOD iff ``1 - ID > max_j (1 - p_no[j]) p[j]``
* baselines: MSP ``max p`` (Hendrycks & Gimpel, ICLR 2017); MaxLogit ``max logits_yes``
  (Hendrycks et al., ICML 2022); Energy ``logsumexp(logits_yes)`` (Liu et al., NeurIPS 2020);
  MCM ``max softmax(cos / tau)`` (Ming et al., NeurIPS 2022)
* with negative labels (NegLabel, Jiang et al., ICLR 2024; :mod:`clipn_core.negatives`: text
  embeddings ``W_neg`` [M, D] split into G groups ``N_g`` by ``j mod G``; ``l_neg = s f W_neg^T``):
  NegLabel ``mean_g sum_ID e^l_yes / (sum_ID e^l_yes + sum_{N_g} e^l_neg)``;
  CLIPN-Neg: ATD with the negatives in the softmax, ``p' = softmax([l_yes, l_neg])`` and
  ID score ``sum_j (1 - p_no[j]) p'[j]`` over the ID classes; with no negatives it is ATD.
  ATD's threshold-free rule does not carry over (the negatives' mass would count as
  p_ood and flag nearly everything): threshold it with ``clipn calibrate``.
* with a lake bank of ID and OOD image proxies (:mod:`clipn_core.lake_bank`):
  CLIPN-Neg-Lake ``clipn_neg * sigmoid(s (max_k cos(f, id_k) - max_k cos(f, ood_k)))``;
  without a bank it is CLIPN-Neg.

``SCORES`` is the only list of scores in the project: jobs, the CLI, the output schema
and the evaluation report all iterate over it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

import torch

DEFAULT_LOGIT_SCALE = 100.0  # ScoreInputs built by hand only: OpenAI CLIP's learned scale; the jobs pass the model's
DEFAULT_MCM_TEMPERATURE = 1.0
DEFAULT_NEGATIVE_GROUPS = 100  # NegLabel's grouping: the score is averaged over this many groups of negatives


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
        negatives: torch.Tensor | None = None,
        negative_groups: int = DEFAULT_NEGATIVE_GROUPS,
        bank: tuple[torch.Tensor, torch.Tensor] | None = None,
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
        self.negatives = None if negatives is None or len(negatives) == 0 else negatives.float().to(self.features.device)
        self.negative_groups = max(1, min(int(negative_groups), len(self.negatives) if self.negatives is not None else 1))
        # (ID proxies, OOD proxies) of the lake bank; an empty side means no bank
        self.bank = (None if bank is None or len(bank[0]) == 0 or len(bank[1]) == 0
                     else tuple(b.float().to(self.features.device) for b in bank))

    @cached_property
    def bank_id_share(self) -> torch.Tensor:
        """S_img = sigmoid(s (max_k cos(f, id_k) - max_k cos(f, ood_k))), [N]; 1 without a lake bank."""
        if self.bank is None:
            return self.features.new_ones(self.features.shape[0])
        id_p, ood_p = self.bank
        gap = (self.features @ id_p.T).max(dim=-1).values - (self.features @ ood_p.T).max(dim=-1).values
        return torch.sigmoid(self.logit_scale * gap)

    @cached_property
    def logits_neg(self) -> torch.Tensor:
        """s f W_neg^T, [N, M]; [N, 0] when there are no negative labels."""
        if self.negatives is None:
            return self.features.new_zeros((self.features.shape[0], 0))
        return self.logit_scale * (self.features @ self.negatives.T)

    @cached_property
    def negative_group_lse(self) -> torch.Tensor:
        """logsumexp of the negative logits within each group ``j mod G``, [N, G]."""
        n, m = self.logits_neg.shape
        g = self.negative_groups
        padded = self.logits_neg
        if m % g:  # -inf columns fill the last row of groups (no copy when M is a multiple of G)
            padded = torch.full((n, -(-m // g) * g), float("-inf"), device=self.features.device)
            padded[:, :m] = self.logits_neg
        # column j of group j mod g sits at [.., j // g, j mod g]
        return torch.logsumexp(padded.reshape(n, -1, g), dim=1)

    @cached_property
    def negative_lse(self) -> torch.Tensor:
        """logsumexp of all negative logits, [N, 1] (from the groups' logsumexps, which partition them)."""
        return torch.logsumexp(self.negative_group_lse, dim=-1, keepdim=True)

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
        """p_no[j] = e^{l_no} / (e^{l_yes} + e^{l_no}) = sigmoid(l_no - l_yes), [N, C]."""
        return torch.sigmoid(self.logits_no - self.logits_yes)

    @cached_property
    def p_yes(self) -> torch.Tensor:
        """1 - p_no[j] = e^{l_yes} / (e^{l_yes} + e^{l_no}) = sigmoid(l_yes - l_no), [N, C]: accurate to float32's
        relative precision at any gap (``1 - p_no`` is exactly 0 from a gap of about 17)."""
        return torch.sigmoid(self.logits_yes - self.logits_no)

    @cached_property
    def predicted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(class index [N] int64, its probability p[k] [N])."""
        prob, idx = self.probs.max(dim=-1)
        return idx, prob


@dataclass(frozen=True)
class Score:
    """One registered score: its name, function and what it reads (the no tower, negative labels, a lake bank).

    ``needs_negatives`` / ``uses_bank``: the score's values change with the negative labels / the lake bank, so a
    threshold calibrated for it holds only with the same ones.
    """

    name: str
    fn: Callable[[ScoreInputs], ScoreResult]
    needs_no_tower: bool
    threshold_free: bool
    description: str
    needs_negatives: bool = False
    uses_bank: bool = False


SCORES: dict[str, Score] = {}


def register(name: str, *, needs_no_tower: bool, threshold_free: bool = False, needs_negatives: bool = False,
             uses_bank: bool = False):
    """Decorator adding a score function to :data:`SCORES` under ``name``."""

    def wrap(fn: Callable[[ScoreInputs], ScoreResult]) -> Callable[[ScoreInputs], ScoreResult]:
        if name in SCORES:
            raise ValueError(f"score {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        SCORES[name] = Score(name, fn, needs_no_tower, threshold_free, doc[0] if doc else "", needs_negatives,
                             uses_bank)
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
    p_yes_k = x.p_yes.gather(1, k[:, None]).squeeze(1)
    return ScoreResult(p_yes_k, x.p_no.gather(1, k[:, None]).squeeze(1) > 0.5)


@register("atd", needs_no_tower=True, threshold_free=True)
def atd(x: ScoreInputs) -> ScoreResult:
    """CLIPN agreeing-to-differ: sum_j (1 - p_no[j]) p[j]; OOD iff p_ood > max_j of the terms."""
    terms = x.p_yes * x.probs
    id_score = terms.sum(dim=-1)
    return ScoreResult(id_score, (1.0 - id_score) > terms.max(dim=-1).values)


@register("neglabel", needs_no_tower=False, needs_negatives=True)
def neglabel(x: ScoreInputs) -> ScoreResult:
    """NegLabel: ID mass against each group of negative labels, averaged over the groups."""
    id_lse = torch.logsumexp(x.logits_yes, dim=-1, keepdim=True)
    return ScoreResult(torch.sigmoid(id_lse - x.negative_group_lse).mean(dim=-1))


@register("clipn_neg", needs_no_tower=True, needs_negatives=True)
def clipn_neg(x: ScoreInputs) -> ScoreResult:
    """CLIPN-Neg: ATD whose class softmax also holds the negative labels (use a calibrated threshold)."""
    # softmax([l_yes, l_neg]) over the ID columns only: exp(l_yes - logsumexp of all), without an [N, C + M] copy
    lse_all = torch.logaddexp(torch.logsumexp(x.logits_yes, dim=-1, keepdim=True), x.negative_lse)
    joint = torch.exp(x.logits_yes - lse_all)
    return ScoreResult((x.p_yes * joint).sum(dim=-1))


@register("clipn_neg_lake", needs_no_tower=True, needs_negatives=True, uses_bank=True)
def clipn_neg_lake(x: ScoreInputs) -> ScoreResult:
    """Lake-adaptive CLIPN-Neg: clipn_neg times the lake bank's S_img (clipn_neg itself without a bank)."""
    return ScoreResult(clipn_neg(x).id_score * x.bank_id_share)


def applicable(inputs: ScoreInputs) -> list[str]:
    """The registered scores ``inputs`` can compute (no-tower scores need no heads; negative ones negatives)."""
    return [n for n, s in SCORES.items()
            if (inputs.heads_no is not None or not s.needs_no_tower)
            and (inputs.negatives is not None or not s.needs_negatives)]


def compute_scores(inputs: ScoreInputs, names: Iterable[str] | None = None) -> dict[str, ScoreResult]:
    """Run the named scores (all applicable ones, :func:`applicable`, when ``names`` is None) on one batch."""
    selected = applicable(inputs) if names is None else list(names)
    unknown = [n for n in selected if n not in SCORES]
    if unknown:
        raise KeyError(f"unknown score(s) {unknown}; registered: {sorted(SCORES)}")
    return {n: SCORES[n].fn(inputs) for n in selected}

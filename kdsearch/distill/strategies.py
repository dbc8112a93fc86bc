"""Ensemble strategies: how T teachers' logits become one soft target per sample.

Every strategy is a pure function ``(teacher_logits [T, B, C], labels [B], temperature) -> probs [B, C]``
registered by name with :func:`register_strategy`; :func:`combine` looks it up. Rows of the result are
probability distributions (non-negative, summing to 1) that the KD loss compares with the student's
tempered softmax (see `kdsearch.distill.losses.KDLoss`). Adding a strategy is one decorated function here;
no other file branches on strategy names.

Why raw logits in and probabilities out: the logit cache stores each teacher's raw logits once, and any
strategy (and any temperature) can then be applied at replay time without asking a teacher again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..imports import ImportPathError, is_import_path, resolve

Strategy = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
"""(teacher_logits [T, B, C], labels [B] int64, temperature) -> soft targets [B, C] (rows sum to 1)."""

_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str) -> Callable[[Strategy], Strategy]:
    """Register a strategy under ``name``; a second registration of the same name is an error."""

    def decorator(fn: Strategy) -> Strategy:
        if name in _STRATEGIES:
            raise ValueError(f"register_strategy: a strategy named {name!r} is already registered")
        _STRATEGIES[name] = fn
        return fn

    return decorator


def list_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name``, or the function an import path ``package.module:function`` names."""
    if is_import_path(name):
        fn = resolve(name)
        if not callable(fn):
            raise ImportPathError(f"{name} is a {type(fn).__name__}, not a function (teacher_logits, labels, "
                                  "temperature) -> soft targets")
        return fn  # type: ignore[no-any-return]
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown ensemble strategy {name!r}; available: {', '.join(list_strategies())}") from None


def _check(teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> None:
    if teacher_logits.dim() != 3:
        raise ValueError(f"teacher_logits must be [T, B, C] (got shape {tuple(teacher_logits.shape)})")
    if labels.shape != teacher_logits.shape[1:2]:
        raise ValueError(f"labels must be [B] with B = {teacher_logits.shape[1]} (got {tuple(labels.shape)})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")


def combine(name: str, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft targets [B, C] (float32 probabilities) from T teachers' logits by the strategy ``name``."""
    _check(teacher_logits, labels, temperature)
    return get_strategy(name)(teacher_logits.float(), labels, float(temperature))


def weighted_targets(teacher_logits: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum_k w[k, b] * softmax(z_k[b] / T): the mixture every weighted strategy returns. weights: [T, B]."""
    probs = F.softmax(teacher_logits / temperature, dim=-1)  # [T, B, C]
    return torch.einsum("tb,tbc->bc", weights, probs)


@register_strategy("average")
def average(teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean of the teachers' tempered probabilities, p = (1/K) sum_k softmax(z_k / T).

    The classic ensemble soft target of Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
    Network" (2015), which averages the ensemble members' predictive distributions.
    """
    k = teacher_logits.shape[0]
    return weighted_targets(teacher_logits, teacher_logits.new_full(teacher_logits.shape[:2], 1.0 / k), temperature)


@register_strategy("vote")
def vote(teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """One-hot on the majority class of the teachers' argmaxes (ties go to the class the average ranks higher).

    Majority voting turns the ensemble into a hard pseudo-label (the "majority voting" baseline the seed
    compares against). The temperature does not soften a one-hot target; in the KD loss the student's
    tempered softmax is pulled towards it, so the KL term is T^2 times a cross-entropy at temperature T.
    Any label smoothing belongs to the loss, not here, so that the strategies stay comparable.
    """
    t, _, c = teacher_logits.shape
    votes = F.one_hot(teacher_logits.argmax(-1), c).sum(0).float()  # [B, C] vote counts
    # Tie-break: add the (0, 1) averaged probability, which never outweighs one whole vote.
    tie = average(teacher_logits, labels, 1.0) * (1.0 - 1e-3)
    return F.one_hot((votes + tie).argmax(-1), c).float()


def ca_mkd_weights(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CA-MKD per-sample teacher weights [T, B]: w_k = (1 - softmax_k(CE_k)) / (K - 1).

    Zhang, Chen & Wang, "Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022, eq. (2):
    CE_k is the cross-entropy of teacher k's (untempered) prediction with the true label, so a teacher that
    is right and confident on a sample has a small CE_k and gets a large weight; the weights of a sample sum
    to 1. With one teacher the weight is 1.
    """
    k, b, _ = teacher_logits.shape
    if k == 1:
        return teacher_logits.new_ones(1, b)
    ce = F.cross_entropy(teacher_logits.reshape(k * b, -1), labels.repeat(k), reduction="none").view(k, b)
    return (1.0 - F.softmax(ce, dim=0)) / (k - 1)


@register_strategy("dynamic")
def dynamic(teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Label-aware dynamic ensemble: p = sum_k w_k softmax(z_k / T) with the CA-MKD weights w_k.

    See :func:`ca_mkd_weights` (Zhang et al., ICASSP 2022). Unlike averaging, a teacher that misclassifies
    a sample contributes little to that sample's target, so the student is not taught a confident mistake.
    """
    return weighted_targets(teacher_logits, ca_mkd_weights(teacher_logits, labels), temperature)


def entropy_weights(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample weights [T, B] = softmax_k(-H_k), H_k the entropy of softmax(z_k / T) in nats.

    Our reading of entropy-based KD (EBKD: Kwon, Na, Lee & Kim, "Adaptive Knowledge Distillation Based on
    Entropy", ICASSP 2020), which uses the teacher labels "with lower entropy at a larger rate": the more
    confident a teacher is on a sample, the more it counts. The exact normalisation in the paper differs;
    this one is label-free, so it also works where labels are noisy.
    """
    logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)  # [T, B]
    return F.softmax(-ent, dim=0)


@register_strategy("entropy")
def entropy(teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """p = sum_k w_k softmax(z_k / T) with the entropy weights of :func:`entropy_weights` (EBKD)."""
    return weighted_targets(teacher_logits, entropy_weights(teacher_logits, temperature), temperature)


def adjust_knowledge(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Knowledge Adjustment: where the target's top class is not the label, swap the two probabilities.

    Wen, Lai & Qian, "Preparing Lessons: Improve Knowledge Distillation with Better Supervision",
    Neurocomputing 2021 (arXiv:1911.07471), section 3.2 ("KA"): the corrected target ranks the true class
    first and keeps the teacher's dark knowledge about every other class (the distribution is only permuted,
    so rows still sum to 1). Rows whose top class is already the label are unchanged.
    """
    top = probs.argmax(-1)
    wrong = top != labels
    if not bool(wrong.any()):
        return probs
    out = probs.clone()
    rows = wrong.nonzero(as_tuple=True)[0]
    p_top, p_true = probs[rows, top[rows]], probs[rows, labels[rows]]
    out[rows, top[rows]] = p_true
    out[rows, labels[rows]] = p_top
    return out


@register_strategy("dynamic_ka")
def dynamic_ka(teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """The dynamic (CA-MKD) ensemble target with Knowledge Adjustment where the ensemble is still wrong.

    CA-MKD's weights already lean on the teacher that is right on a sample; where every teacher is wrong (or
    the weighted mixture still ranks a wrong class first) `dynamic` would teach the student a confident
    mistake with alpha = 0.9 of the loss. `adjust_knowledge` swaps that mistake with the true class. Proposed
    in the issue "Evidence on real images" as the attempt to make per-sample weighting beat averaging; it is
    measured there with the same recipe as the other strategies (benchmarks/results/kd_ablation.md).
    """
    return adjust_knowledge(dynamic(teacher_logits, labels, temperature), labels)

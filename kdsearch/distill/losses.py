"""The ensemble knowledge-distillation loss (Hinton, Vinyals & Dean 2015), as `kdsearch.train.KDLoss`.

    loss = alpha * T^2 * KL(p_T || softmax(s / T)) + (1 - alpha) * CE(s, y)

p_T are the ensemble's soft targets at temperature T from a registered strategy
(`kdsearch.distill.strategies.combine`), s the student's logits and y the labels. The T^2 factor keeps
the soft term's gradients on the same scale as the hard term's when T changes (Hinton et al., sec. 2).
For `vote` the targets are one-hot majority labels, so the soft term is T^2 times a cross-entropy of the
student's tempered softmax with the majority label; `label_smoothing` (Szegedy et al. 2016) mixes any
target with the uniform distribution, which is what keeps a vote target from demanding infinite logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..spec import DistillConfig
from .strategies import combine, get_strategy


@dataclass(frozen=True)
class KDLoss:
    """Callable (student_logits [B, C], teacher_logits [T, B, C], labels [B]) -> scalar loss."""

    strategy: str = "dynamic"
    temperature: float = 4.0
    alpha: float = 0.9
    label_smoothing: float = 0.0  # applied to the soft targets, and to the hard CE term

    def __post_init__(self) -> None:
        get_strategy(self.strategy)  # raises ValueError naming the registered strategies
        if not self.temperature > 0:
            raise ValueError(f"KDLoss.temperature must be > 0 (got {self.temperature})")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"KDLoss.alpha must lie in [0, 1] (got {self.alpha})")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"KDLoss.label_smoothing must lie in [0, 1) (got {self.label_smoothing})")

    @classmethod
    def from_config(cls, cfg: DistillConfig, strategy: str | None = None, label_smoothing: float = 0.0) -> "KDLoss":
        return cls(strategy or cfg.strategy, cfg.temperature, cfg.alpha, label_smoothing)

    def soft_targets(self, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p = combine(self.strategy, teacher_logits, labels, self.temperature)
        if self.label_smoothing:
            p = (1.0 - self.label_smoothing) * p + self.label_smoothing / p.shape[-1]
        return p

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        loss = student_logits.new_zeros(())
        if self.alpha > 0:
            p = self.soft_targets(teacher_logits.float(), labels)
            log_q = F.log_softmax(student_logits.float() / t, dim=-1)
            # kl_div(input=log q, target=p) = sum p (log p - log q); 'batchmean' is the true KL per sample.
            loss = loss + self.alpha * t * t * F.kl_div(log_q, p, reduction="batchmean")
        if self.alpha < 1:
            ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=self.label_smoothing)
            loss = loss + (1.0 - self.alpha) * ce
        return loss

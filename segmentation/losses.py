"""Segmentation losses by name, combinable with weights: ``"ce+dice"``, ``"ce:0.3+tversky:0.7"``.

Tversky's ``alpha`` weighs false positives and ``beta`` missed defects (alpha + beta = 1 keeps the
scale of Dice): raise beta to miss fewer defects at the cost of more false alarms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from defectforge.core.errors import ConfigError
from defectforge.datasets.batches import IGNORE_INDEX

EPS = 1.0


def _valid_one_hot(logits: torch.Tensor, target: torch.Tensor):
    valid = (target != IGNORE_INDEX).unsqueeze(1)
    safe = torch.where(valid.squeeze(1), target, 0)
    one_hot = F.one_hot(safe, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    probs = logits.softmax(dim=1)
    return probs * valid, one_hot * valid


def _present_defect_mean(score: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """Mean over defect classes present in the batch (background and absent classes excluded)."""
    present = one_hot.sum(dim=(0, 2, 3))[1:] > 0
    per_class = score[1:]
    return per_class[present].mean() if present.any() else per_class.mean() * 0


class TverskyLoss(nn.Module):
    def __init__(self, alpha: float = 0.5, beta: float = 0.5):
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs, one_hot = _valid_one_hot(logits, target)
        dims = (0, 2, 3)
        tp = (probs * one_hot).sum(dims)
        fp = (probs * (1 - one_hot)).sum(dims)
        fn = ((1 - probs) * one_hot).sum(dims)
        index = (tp + EPS) / (tp + self.alpha * fp + self.beta * fn + EPS)
        return 1 - _present_defect_mean(index, one_hot)


class FocalLoss(nn.Module):
    def __init__(self, gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
        valid = target != IGNORE_INDEX
        focal = (1 - torch.exp(-ce)) ** self.gamma * ce
        return focal[valid].mean() if valid.any() else focal.sum() * 0


class CrossEntropy(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


# name -> constructor from (tversky_alpha, focal_gamma)
LOSSES: dict[str, Callable[[float, float], nn.Module]] = {
    "ce": lambda alpha, gamma: CrossEntropy(),
    "dice": lambda alpha, gamma: TverskyLoss(0.5, 0.5),
    "focal": lambda alpha, gamma: FocalLoss(gamma),
    "tversky": lambda alpha, gamma: TverskyLoss(alpha, 1 - alpha),
}


def parse_loss(spec: str) -> list[tuple[str, float]]:
    """``"ce:0.5+dice"`` -> ``[("ce", 0.5), ("dice", 1.0)]``; unknown names list the valid ones."""
    terms = []
    for part in spec.replace(" ", "").split("+"):
        name, _, weight = part.partition(":")
        if name not in LOSSES:
            raise ConfigError(
                f"unknown loss {name!r} in {spec!r}; valid: {', '.join(LOSSES)} "
                "(combine as e.g. 'ce+dice' or 'ce:0.3+tversky:0.7')"
            )
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"loss weight {weight!r} in {spec!r} is not a number") from None
        terms.append((name, value))
    return terms


class CombinedLoss(nn.Module):
    """The weighted sum a loss spec names; ``tversky_alpha`` weighs false positives."""

    def __init__(self, spec: str, tversky_alpha: float = 0.5, focal_gamma: float = 2.0):
        super().__init__()
        terms = parse_loss(spec)
        self.weights = [weight for _, weight in terms]
        self.terms = nn.ModuleList([LOSSES[name](tversky_alpha, focal_gamma) for name, _ in terms])

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(
            w * term(logits, target) for w, term in zip(self.weights, self.terms, strict=True)
        )

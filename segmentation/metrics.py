"""Segmentation metrics, stats-then-reduce: one confusion matrix summed over the whole split."""

from __future__ import annotations

import numpy as np
import torch

from defectforge.datasets.batches import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``cm[t, p]`` = pixels of true class t predicted as p; ignored pixels are left out."""
    valid = target != IGNORE_INDEX
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def binary_counts(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image ``[tp, fp, fn]`` of defect (any class > 0) vs background, ignoring padding."""
    valid = target != IGNORE_INDEX
    p = (pred > 0) & valid
    t = (target > 0) & valid
    dims = tuple(range(1, pred.ndim))
    return torch.stack([(p & t).sum(dims), (p & ~t).sum(dims), (~p & t).sum(dims)], dim=1)


def _iou(tp: float, fp: float, fn: float) -> float | None:
    union = tp + fp + fn
    return None if union == 0 else float(tp / union)


def soft_counts(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[intersection, union]`` of the defect probability (1 - P(background)) with the defect
    pixels, summed over the batch, ignoring padding."""
    valid = (target != IGNORE_INDEX).to(logits.dtype)
    defect = (1.0 - logits.softmax(1)[:, 0]) * valid
    truth = (target > 0).to(logits.dtype) * valid
    intersection = (defect * truth).sum()
    return torch.stack([intersection, defect.sum() + truth.sum() - intersection]).double()


def summarize(
    cm: np.ndarray,
    class_names: list[str],
    per_image: np.ndarray | None = None,
    soft: np.ndarray | None = None,
) -> dict:
    """IoU per class, mean defect IoU (classes > 0 that occur), binary defect IoU (the paper's
    headline: all defect classes vs background), pixel accuracy, the confusion matrix; with
    ``soft`` (summed soft_counts of logits) the soft defect IoU of the probabilities.

    A class that neither occurs nor is predicted has IoU None and is left out of the means.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    per_class = {name: _iou(tp[i], fp[i], fn[i]) for i, name in enumerate(class_names)}
    defect = [v for name, v in list(per_class.items())[1:] if v is not None]
    binary_tp = cm[1:, 1:].sum()
    result = {
        "binary_defect_iou": _iou(binary_tp, cm[0, 1:].sum(), cm[1:, 0].sum()),
        "mean_defect_iou": float(np.mean(defect)) if defect else None,
        "miou": float(np.mean([v for v in per_class.values() if v is not None])),
        "per_class_iou": per_class,
        "pixel_accuracy": float(tp.sum() / cm.sum()) if cm.sum() else None,
        "confusion_matrix": cm.astype(np.int64).tolist(),
        "class_names": list(class_names),
    }
    if per_image is not None and len(per_image):
        scores = [s for s in (_iou(*row) for row in per_image.tolist()) if s is not None]
        result["per_image_binary_iou_mean"] = float(np.mean(scores)) if scores else None
    if soft is not None and soft[1] > 0:
        result["soft_defect_iou"] = float(soft[0] / soft[1])
    return result


class MetricAccumulator:
    """Sums the confusion matrix and per-image binary counts batch by batch; given logits, also
    the soft defect intersection and union."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.per_image: list[torch.Tensor] = []
        self.soft = torch.zeros(2, dtype=torch.float64)

    def update(self, logits_or_pred: torch.Tensor, target: torch.Tensor) -> None:
        pred = logits_or_pred
        if logits_or_pred.ndim == 4:
            self.soft += soft_counts(logits_or_pred, target.to(logits_or_pred.device)).cpu()
            pred = logits_or_pred.argmax(1)
        pred, target = pred.cpu(), target.cpu()
        self.cm += confusion_matrix(pred, target, self.num_classes)
        self.per_image.append(binary_counts(pred, target))

    def summary(self, class_names: list[str]) -> dict:
        per_image = torch.cat(self.per_image).numpy() if self.per_image else None
        return summarize(self.cm.numpy(), class_names, per_image, self.soft.numpy())

    def per_image_iou(self) -> list[float | None]:
        """Each image's binary defect IoU in the order seen; None where it has no defect and
        none was predicted (IoU undefined: a correct OK)."""
        rows = torch.cat(self.per_image).tolist() if self.per_image else []
        return [_iou(*row) for row in rows]


def auroc(scores: list[float], positive: list[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` separating positives from negatives (the
    Mann-Whitney statistic, ties counted half); None without both kinds of example."""
    from scipy.stats import rankdata

    scores_array, labels = np.asarray(scores, float), np.asarray(positive, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return None
    ranks = rankdata(scores_array)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))

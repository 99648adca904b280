import numpy as np
import pytest
import torch

from defectforge.datasets.batches import IGNORE_INDEX
from defectforge.segmentation.losses import CombinedLoss, TverskyLoss, parse_loss
from defectforge.segmentation.metrics import MetricAccumulator, confusion_matrix, summarize

pytestmark = pytest.mark.floors  # .ci/floors runs them at the lowest versions

NAMES = ["background", "a", "b"]


def test_confusion_matrix_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 0, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 1, 0], [2, 1, 0, 2]])
    cm = confusion_matrix(pred, target, 3)
    expected = [[2, 1, 0], [1, 1, 0], [0, 1, 1]]
    assert cm.tolist() == expected


def test_summary_iou_values_by_hand():
    cm = np.array([[2, 1, 0], [1, 1, 0], [0, 1, 1]])
    result = summarize(cm, NAMES)
    # class a: tp 1, fp 1+1, fn 1 -> 1/4; class b: tp 1, fp 0, fn 1 -> 1/2
    assert result["per_class_iou"]["a"] == pytest.approx(0.25)
    assert result["per_class_iou"]["b"] == pytest.approx(0.5)
    assert result["mean_defect_iou"] == pytest.approx(0.375)
    # binary: defect tp = a/b predicted as any defect = 1+0+1+1 = 3; fp = 1; fn = 1
    assert result["binary_defect_iou"] == pytest.approx(3 / 5)
    assert result["pixel_accuracy"] == pytest.approx(4 / 7)


def test_accumulator_sums_the_split_not_batch_means():
    acc = MetricAccumulator(2)
    acc.update(torch.tensor([[1, 1, 1, 1]]), torch.tensor([[1, 1, 1, 1]]))  # IoU 1
    acc.update(torch.tensor([[1, 0, 0, 0]]), torch.tensor([[0, 0, 0, 1]]))  # IoU 0
    result = acc.summary(["background", "defect"])
    assert result["binary_defect_iou"] == pytest.approx(4 / 6)  # not the mean 0.5
    assert result["per_image_binary_iou_mean"] == pytest.approx(0.5)


def test_absent_class_is_none_and_left_out():
    result = summarize(np.array([[5, 0, 0], [0, 3, 0], [0, 0, 0]]), NAMES)
    assert result["per_class_iou"]["b"] is None
    assert result["mean_defect_iou"] == pytest.approx(1.0)


def _logits_for(pred: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, classes).permute(0, 3, 1, 2).float() * 20


def test_tversky_alpha_trades_false_positives_against_misses():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :4, :4] = 1
    over = target.clone()
    over[0, :6, :6] = 1  # false positives only
    under = torch.zeros_like(target)
    under[0, :2, :2] = 1  # misses only
    fp_averse, miss_averse = TverskyLoss(0.8, 0.2), TverskyLoss(0.2, 0.8)
    assert fp_averse(_logits_for(over, 2), target) > miss_averse(_logits_for(over, 2), target)
    assert miss_averse(_logits_for(under, 2), target) > fp_averse(_logits_for(under, 2), target)
    assert fp_averse(_logits_for(target, 2), target) < 1e-3


def test_loss_spec_parsing_and_errors():
    assert parse_loss("ce:0.3+tversky:0.7") == [("ce", 0.3), ("tversky", 0.7)]
    with pytest.raises(ValueError, match="valid: ce, dice, focal, tversky"):
        parse_loss("bce")
    with pytest.raises(ValueError, match="not a number"):
        parse_loss("ce:x")


def test_combined_loss_ignores_padding():
    loss = CombinedLoss("ce+dice+focal+tversky", tversky_alpha=0.5, focal_gamma=2.0)
    target = torch.full((1, 4, 4), IGNORE_INDEX)
    target[0, :2] = 1
    logits = _logits_for(torch.where(target == IGNORE_INDEX, 0, target), 2)
    assert loss(logits, target).item() < 1e-3


def test_soft_iou_breaks_a_tie_of_hard_iou_that_asha_could_not_rank():
    """Two models that both predict no defect pixel score the same hard IoU (0); the one whose
    defect probability leans towards the true defect ranks higher, and ignored pixels count for
    nothing."""
    from defectforge.segmentation.selection import RANKING_METRIC, SELECTION_METRIC, ranking_score

    target = torch.tensor([[[1, 1], [0, IGNORE_INDEX]]])

    def metrics(defect_logit: list[float]) -> dict:
        logits = torch.zeros(1, 2, 2, 2)
        logits[0, 1] = torch.tensor(defect_logit).reshape(2, 2)  # background logit 0
        accumulator = MetricAccumulator(2)
        accumulator.update(logits, target)
        summary = accumulator.summary(["background", "defect"])
        row = {f"val_{k}": v for k, v in summary.items()}
        return {**row, RANKING_METRIC: ranking_score(row)}

    leaning, indifferent = metrics([-0.1, -0.1, -5.0, 9.0]), metrics([-5.0, -5.0, -5.0, 9.0])
    assert leaning[SELECTION_METRIC] == indifferent[SELECTION_METRIC] == 0.0
    p, q = torch.sigmoid(torch.tensor(-0.1)).item(), torch.sigmoid(torch.tensor(-5.0)).item()
    # intersection 2p; union = predicted (2p + q) + true 2 - intersection 2p
    assert leaning["val_soft_defect_iou"] == pytest.approx(2 * p / (2 + q))
    assert leaning[RANKING_METRIC] > indifferent[RANKING_METRIC] > 0.0
    # A hard IoU difference always outranks the tie-break.
    assert ranking_score({SELECTION_METRIC: 0.001, "val_soft_defect_iou": 0.0}) > ranking_score(
        {SELECTION_METRIC: 0.0, "val_soft_defect_iou": 1.0}
    )

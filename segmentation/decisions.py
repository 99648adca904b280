"""From a predicted mask to a decision: per-image findings, an OK/NG verdict, and the operating
point (probability threshold, minimum region area) calibrated on images whose truth is known.

An image is NG when some 8-connected region of pixels whose defect probability (1 - background
probability) is at least ``threshold`` covers at least ``min_area`` pixels. Calibration scores
every val image once per candidate threshold (its largest region) and picks the point that
reaches a target recall (share of defective images called NG) with the fewest false alarms
(share of defect-free images called NG), or the most recall within a false-alarm budget.
numpy and OpenCV only: the export runtime decides the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from defectforge.core.config import TypedConfig, option
from defectforge.core.errors import ConfigError

OPERATING_POINT_FILE = "operating_point.json"
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 1.0, 0.05))
AREAS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _probability(value: float) -> bool:
    return 0 < value < 1


@dataclass(frozen=True)
class OperatingPoint(TypedConfig):
    """When an image is NG; stored beside a model (and in an export's model.json)."""

    kind = "operating point"

    threshold: float = option(
        0.5, "defect probability a pixel needs to count", _probability, "in (0, 1)"
    )
    min_area: int = option(
        1, "pixels the largest such region needs for NG", lambda a: a >= 1, ">= 1"
    )


def _rate(value: float) -> bool:
    return 0 <= value <= 1


@dataclass(frozen=True)
class CalibrationTarget(TypedConfig):
    """What the operating point is calibrated for (`seg calibrate`, `study export`, a spec's
    export section): a recall, or a false-alarm budget."""

    kind = "calibration target"

    target_recall: float | None = option(
        None, "share of defective val images to call NG, e.g. 0.95", _rate, "in [0, 1]"
    )
    target_false_alarm: float | None = option(
        None,
        "or the largest share of defect-free val images to call NG, e.g. 0.05",
        _rate,
        "in [0, 1]",
    )

    def check(self) -> None:
        if self.target_recall is not None and self.target_false_alarm is not None:
            raise ConfigError("give one of target_recall and target_false_alarm, not both")

    @property
    def given(self) -> bool:
        return self.target_recall is not None or self.target_false_alarm is not None

    def require(self) -> CalibrationTarget:
        """This target, or a ConfigError if it names neither rate."""
        if not self.given:
            raise ConfigError(
                "give target_recall (--target-recall) or target_false_alarm (--target-false-alarm)"
            )
        return self


def defect_probability(probabilities: np.ndarray) -> np.ndarray:
    """H x W probability of any defect class, from K x H x W class probabilities."""
    return 1.0 - probabilities[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    return shifted / shifted.sum(axis=0, keepdims=True)


def largest_region(mask: np.ndarray) -> int:
    """Pixels in the largest 8-connected region of a boolean mask (0 if it is empty)."""
    if not mask.any():
        return 0
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return int(stats[1:, cv2.CC_STAT_AREA].max()) if count > 1 else 0


def decided_mask(probabilities: np.ndarray, point: OperatingPoint) -> np.ndarray:
    """H x W uint8 class map of what the verdict counts: the pixels whose defect probability
    reaches the threshold, in 8-connected regions of at least ``min_area`` pixels, each with its
    most probable defect class; 0 elsewhere. So an OK image's mask is empty, an NG image's is
    not, and the threshold a user gives changes what is drawn."""
    above = (defect_probability(probabilities) >= point.threshold).astype(np.uint8)
    count, regions, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
    counted = stats[:, cv2.CC_STAT_AREA] >= point.min_area
    counted[0] = False  # label 0: the pixels below the threshold
    defect_class = probabilities[1:].argmax(0) + 1
    return np.where(counted[regions], defect_class, 0).astype(np.uint8)


def findings(
    probabilities: np.ndarray,
    classes: tuple[str, ...],
    point: OperatingPoint,
    decided: np.ndarray | None = None,
) -> dict:
    """One image's row of predictions.csv: verdict, its evidence, and the pixels per defect
    class of its decided mask (``decided``: that mask, if the caller has it already)."""
    defect = defect_probability(probabilities)
    largest = largest_region(defect >= point.threshold)
    if decided is None:
        decided = decided_mask(probabilities, point)
    row = {
        "verdict": "NG" if largest >= point.min_area else "OK",
        "max_defect_probability": round(float(defect.max()), 6),
        "largest_region_px": largest,
    }
    for index, name in enumerate(classes[1:], start=1):
        row[f"{name}_px"] = int((decided == index).sum())
    return row


def largest_by_threshold(probabilities: np.ndarray) -> list[int]:
    """The largest region at every candidate threshold: what calibration needs of one image."""
    defect = defect_probability(probabilities)
    return [largest_region(defect >= threshold) for threshold in THRESHOLDS]


def _rates(largest: np.ndarray, defective: np.ndarray, area: int) -> tuple[float, float]:
    called = largest >= area
    recall = called[defective].mean() if defective.any() else 0.0
    false_alarm = called[~defective].mean() if (~defective).any() else 0.0
    return float(recall), float(false_alarm)


def calibrate(
    largest: list[list[int]],
    defective: list[bool],
    target_recall: float | None = None,
    target_false_alarm: float | None = None,
) -> dict:
    """The operating point for a target recall (fewest false alarms among the points reaching
    it) or a false-alarm budget (most recall within it), from each image's largest region per
    threshold and whether it truly has a defect. Where no point reaches the target, the one
    coming closest is taken and ``met`` is False."""
    CalibrationTarget(target_recall, target_false_alarm).require()
    table = np.asarray(largest)
    truth = np.asarray(defective, bool)
    points = []
    for column, threshold in enumerate(THRESHOLDS):
        for area in AREAS:
            recall, false_alarm = _rates(table[:, column], truth, area)
            points.append((threshold, area, recall, false_alarm))
    if target_recall is not None:
        met = [p for p in points if p[2] >= target_recall]
        # fewest false alarms; then the strictest point (highest threshold, largest area)
        best = (
            min(met, key=lambda p: (p[3], -p[0], -p[1]))
            if met
            else max(points, key=lambda p: (p[2], -p[3]))
        )
    else:
        met = [p for p in points if p[3] <= target_false_alarm]
        best = (
            max(met, key=lambda p: (p[2], -p[3], p[0], p[1]))
            if met
            else min(points, key=lambda p: (p[3], -p[2]))
        )
    threshold, area, recall, false_alarm = best
    return {
        "operating_point": asdict(OperatingPoint(threshold=threshold, min_area=area)),
        "target": {"recall": target_recall}
        if target_recall is not None
        else {"false_alarm": target_false_alarm},
        "met": bool(met),
        "recall": recall,
        "false_alarm_rate": false_alarm,
        "images": int(truth.size),
        "defective_images": int(truth.sum()),
        "curve": [
            {"threshold": t, "min_area": a, "recall": r, "false_alarm_rate": f}
            for t, a, r, f in points
            if a == area
        ],
    }


def verdict_counts(verdicts: list[str], defective: list[bool]) -> dict:
    """The confusion of verdicts against the truth (a defect in the true mask = should be NG)."""
    pairs = list(zip(verdicts, defective, strict=True))
    return {
        "true_ng": sum(v == "NG" and d for v, d in pairs),
        "false_ng": sum(v == "NG" and not d for v, d in pairs),
        "true_ok": sum(v == "OK" and not d for v, d in pairs),
        "missed_ng": sum(v == "OK" and d for v, d in pairs),
    }

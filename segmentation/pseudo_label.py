"""Pseudo-labels for generated images: the labeller's prediction, corrected and scored. No I/O.

The paper closed holes in the labeller's masks with morphology; here each correction is its own
step (hole filling, closing, small-region removal) so the label-quality report can show what each
one does on images whose truth is known. Every step works per defect class and only ever writes
into background pixels, so neighbouring classes are never overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from defectforge.core.config import TypedConfig, option
from defectforge.core.errors import ConfigError
from defectforge.datasets.readers import dominant_class

CORRECTION_STEPS = ("fill_holes", "closing", "min_area")


NON_NEGATIVE = (lambda v: v >= 0, ">= 0")


@dataclass(frozen=True)
class Corrections(TypedConfig):
    """The paper's mask corrections, each its own step."""

    kind = "corrections"

    fill_holes: bool = option(
        True, "fill holes inside predicted regions (the paper's correction; default on)"
    )
    closing_kernel: int = option(0, "morphological closing, kernel side in px", *NON_NEGATIVE)
    min_region_area: int = option(0, "drop predicted regions smaller than this (px)", *NON_NEGATIVE)

    def steps(self) -> tuple[str, ...]:
        """The steps this configuration switches on, in the order they are applied."""
        enabled = {
            "fill_holes": self.fill_holes,
            "closing": self.closing_kernel > 0,
            "min_area": self.min_region_area > 0,
        }
        return tuple(step for step in CORRECTION_STEPS if enabled[step])

    def only(self, step: str) -> Corrections:
        """The same parameters with only ``step`` switched on (for the per-step report)."""
        return Corrections(
            fill_holes=step == "fill_holes",
            closing_kernel=self.closing_kernel if step == "closing" else 0,
            min_region_area=self.min_region_area if step == "min_area" else 0,
        )


def _defect_classes(mask: np.ndarray) -> list[int]:
    return [int(k) for k in np.unique(mask) if k > 0]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background pixels enclosed by one class's region take that class (a ring becomes a disc)."""
    out = mask.copy()
    for k in _defect_classes(mask):
        outside = (mask != k).astype(np.uint8)
        _, labels = cv2.connectedComponents(outside, connectivity=4)
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        enclosed = ~np.isin(labels, border) & (outside > 0)
        out[enclosed & (out == 0)] = k
    return out


def close_regions(mask: np.ndarray, kernel: int) -> np.ndarray:
    """Morphological closing of each class with an elliptical kernel, into background only."""
    element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel, kernel))
    out = mask.copy()
    for k in _defect_classes(mask):
        closed = cv2.morphologyEx((mask == k).astype(np.uint8), cv2.MORPH_CLOSE, element)
        out[(closed > 0) & (out == 0)] = k
    return out


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Regions (8-connected, per class) smaller than ``min_area`` pixels become background."""
    out = mask.copy()
    for k in _defect_classes(mask):
        _, labels, stats, _ = cv2.connectedComponentsWithStats(
            (mask == k).astype(np.uint8), connectivity=8
        )
        small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < min_area)
        small = small[small > 0]
        out[np.isin(labels, small)] = 0
    return out


def correct(mask: np.ndarray, corrections: Corrections) -> np.ndarray:
    if corrections.fill_holes:
        mask = fill_holes(mask)
    if corrections.closing_kernel:
        mask = close_regions(mask, corrections.closing_kernel)
    if corrections.min_region_area:
        mask = remove_small_regions(mask, corrections.min_region_area)
    return mask


def label_confidence(probabilities: np.ndarray, mask: np.ndarray) -> float:
    """Mean max-softmax over the pixels the labeller called defect (0 when it called none).

    ``probabilities`` is K x H x W softmax output, ``mask`` its argmax.
    """
    defect = mask > 0
    if not defect.any():
        return 0.0
    return float(probabilities.max(axis=0)[defect].mean())


@dataclass(frozen=True)
class PseudoLabel:
    mask: np.ndarray
    confidence: float
    defect_fraction: float
    defect_class: str | None  # the class with most pixels (before any binarising)
    rejected: str  # "" when kept, else why it was dropped


def pseudo_label(
    probabilities: np.ndarray,
    classes: tuple[str, ...],
    corrections: Corrections,
    min_confidence: float,
    binary: bool,
) -> PseudoLabel:
    """Turn one image's softmax output (over ``classes``) into a corrected mask, its scores and
    the keep decision."""
    raw = probabilities.argmax(axis=0).astype(np.uint8)
    confidence = label_confidence(probabilities, raw)
    mask = correct(raw, corrections)
    defect_class = dominant_class(mask, classes)
    if binary:
        mask = (mask > 0).astype(np.uint8)
    fraction = float((mask > 0).mean())
    if fraction == 0:
        rejected = "no defect"
    elif confidence < min_confidence:
        rejected = "low confidence"
    else:
        rejected = ""
    return PseudoLabel(mask, confidence, fraction, defect_class, rejected)


def parse_size(text: str) -> tuple[int, int]:
    """``200x200`` or ``200`` -> (200, 200)."""
    parts = text.lower().split("x")
    try:
        height, width = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        height = width = 0
    if height < 1 or width < 1:
        raise ConfigError(f"give a size as HxW or one side, e.g. 200x200, not {text!r}")
    return height, width


@dataclass(frozen=True)
class LabelConfig(TypedConfig):
    """A labelling job; saved in the labelled dataset's manifest."""

    kind = "label config"

    images: str = option(help="`gan generate` output or a folder of images", path=True)
    labeller: str = option(help="run folder of `seg train` that labels them", path=True)
    corrections: Corrections = option(Corrections(), cli=False)
    min_confidence: float = option(
        0.0, "drop images labelled less surely", lambda v: 0 <= v <= 1, "in [0, 1]"
    )
    binary: bool = option(False, "defect vs background masks")
    # Labelled at the scale the labeller and the real images have: native-scale GAN crops as
    # they are, whole images resized by the GAN back to the real images' size.
    size: tuple[int, ...] = option(
        (),
        "label at HxW (none: the generated images' own size if the GAN learnt native-scale "
        "crops, else the labeller's most common train size)",
        lambda s: not s or (len(s) == 2 and min(s) >= 1),
        "HxW with both sides >= 1 (or none)",
        parse=parse_size,
        metavar="HxW",
    )
    actors: int = option(1, "labeller copies (one model each)", lambda v: v >= 1, ">= 1")
    batch_size: int = option(16, "images per labelling batch", lambda v: v >= 1, ">= 1")
    use_gpu: bool = option(False, "one GPU per actor")

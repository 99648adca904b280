"""Pictures of a prediction: its mask drawn over the image (one colour per class) and its defect
probability as a heatmap (no model code, so exports can use it)."""

from __future__ import annotations

import cv2
import numpy as np

OVERLAY_COLOURS = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
    ],
    np.uint8,
)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB picture of the image with each class's pixels tinted in its colour."""
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.shape[2] == 1 else image.copy()
    defect = mask > 0
    if defect.any():
        colours = OVERLAY_COLOURS[mask[defect] % len(OVERLAY_COLOURS)]
        # uint8 arithmetic (OpenCV's, saturating and rounded), on the defect pixels alone: a
        # predict pays it for every image.
        rgb[defect] = cv2.addWeighted(rgb[defect], 1 - alpha, colours, alpha, 0.0)
    return rgb


def heatmap(defect_probability: np.ndarray) -> np.ndarray:
    """RGB picture of an H x W defect probability: the inferno colour map, black at 0, pale
    yellow at 1 (what inspection tools show; the level is round(255 * probability))."""
    levels = np.round(np.clip(defect_probability, 0.0, 1.0) * 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)

"""Masks drawn over their images: one colour per class (no model code, so exports can use it)."""

from __future__ import annotations

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
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image.copy()
    colours = OVERLAY_COLOURS[mask % len(OVERLAY_COLOURS)]
    tinted = (rgb * (1 - alpha) + colours * alpha).astype(np.uint8)
    return np.where(mask[:, :, None] > 0, tinted, rgb)

"""The paper's conventional augmentation, scaled by one ``strength`` in [0, 1].

At strength 1: shift up to 20% of the side, rotation 0-180 degrees, scale 1-2x, horizontal and
vertical flips, additive Gaussian noise and brightness change, each at the paper's range. At
strength s every range and probability is multiplied by s; 0 is the identity. Geometry moves the
mask with nearest-neighbour interpolation and reflects both image and mask at the border, so a
defect never separates from its label.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from dataclasses import dataclass  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from defectforge.core.config import SEED, TypedConfig, option  # noqa: E402

if TYPE_CHECKING:
    import albumentations as A

MAX_SHIFT = 0.2
MAX_ROTATION_DEGREES = 180.0
MAX_EXTRA_SCALE = 1.0
MAX_NOISE_STD = 0.08
MAX_BRIGHTNESS = 0.25
OP_PROBABILITY = 0.5


STRENGTH_HELP = "the paper's augmentation scaled: 0 none, 1 its full ranges"


def valid_strength(strength: float) -> bool:
    return 0.0 <= strength <= 1.0


@dataclass(frozen=True)
class AugmentConfig(TypedConfig):
    """The paper's offline k-fold expansion of a train split."""

    kind = "augmentation config"

    factor: int = option(
        15, "copies of each train image, itself included (paper: 15)", lambda f: f >= 1, ">= 1"
    )
    strength: float = option(1.0, STRENGTH_HELP, valid_strength, "in [0, 1]")
    seed: int = option(0, "seed of the augmented copies", *SEED)


def paper_augmentation(strength: float, seed: int | None = None) -> A.Compose:
    """An albumentations pipeline for ``(image HxWxC uint8, mask HxW uint8)`` pairs; ``strength``
    as checked by the configs that carry it (``valid_strength``)."""
    # Here, not at the top: albumentations imports torch (seconds per fresh process; CHANGELOG,
    # Speed), which Ray Data tasks that only read, mix or expand rows never need.
    import albumentations as A

    s = strength
    if s == 0:
        return A.Compose([], seed=seed)
    shift = MAX_SHIFT * s
    return A.Compose(
        [
            A.HorizontalFlip(p=OP_PROBABILITY * s),
            A.VerticalFlip(p=OP_PROBABILITY * s),
            A.Affine(
                translate_percent={"x": (-shift, shift), "y": (-shift, shift)},
                rotate=(0.0, MAX_ROTATION_DEGREES * s),
                scale=(1.0, 1.0 + MAX_EXTRA_SCALE * s),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_REFLECT_101,
                p=s,
            ),
            A.GaussNoise(std_range=(0.0, MAX_NOISE_STD * s), p=OP_PROBABILITY * s),
            A.RandomBrightnessContrast(
                brightness_limit=MAX_BRIGHTNESS * s, contrast_limit=0.0, p=OP_PROBABILITY * s
            ),
        ],
        seed=seed,
    )


def augment_pair(
    transform: A.Compose, image: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``transform`` to one pair; keeps the HxWxC shape for 1-channel images."""
    out = transform(image=image, mask=mask)
    augmented = out["image"]
    if augmented.ndim == 2:
        augmented = augmented[:, :, None]
    return augmented, out["mask"]

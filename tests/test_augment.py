import numpy as np
import pytest

from defectforge.datasets.augment import augment_pair, paper_augmentation
from defectforge.segmentation.config import SegConfig

pytestmark = pytest.mark.floors  # .ci/floors runs them at the lowest versions


def _drawn_pair():
    """An image whose bright pixels are exactly the mask: any misalignment shows."""
    mask = np.zeros((96, 96), np.uint8)
    mask[20:50, 30:40] = 3
    mask[60:70, 10:80] = 1
    image = np.where(mask[:, :, None] > 0, 230, 20).astype(np.uint8)
    return image, mask


def test_strength_zero_is_identity():
    image, mask = _drawn_pair()
    out_image, out_mask = augment_pair(paper_augmentation(0.0, seed=1), image, mask)
    assert np.array_equal(out_image, image) and np.array_equal(out_mask, mask)


@pytest.mark.parametrize("seed", range(8))
def test_mask_moves_with_the_image(seed):
    image, mask = _drawn_pair()
    out_image, out_mask = augment_pair(paper_augmentation(1.0, seed=seed), image, mask)
    assert out_image.shape == image.shape and out_mask.shape == mask.shape
    assert set(np.unique(out_mask)) <= {0, 1, 3}  # nearest-neighbour: no new class values
    bright = out_image[:, :, 0] > 125
    defect = out_mask > 0
    iou = (bright & defect).sum() / max((bright | defect).sum(), 1)
    assert iou > 0.85


def test_full_strength_changes_pixels_and_is_seeded():
    image, mask = _drawn_pair()
    outs = [augment_pair(paper_augmentation(1.0, seed=7), image, mask)[0] for _ in range(2)]
    assert np.array_equal(outs[0], outs[1])
    changed = sum(
        not np.array_equal(augment_pair(paper_augmentation(1.0, seed=s), image, mask)[0], image)
        for s in range(6)
    )
    assert changed >= 5


def test_strength_out_of_range_is_refused_by_every_config_that_carries_it():
    from defectforge.core.errors import ConfigError
    from defectforge.datasets.augment import AugmentConfig

    with pytest.raises(ConfigError, match=r"strength = 1.5: must be in \[0, 1\]"):
        AugmentConfig(strength=1.5)
    with pytest.raises(ConfigError, match=r"aug_strength = -0.1: must be in \[0, 1\]"):
        SegConfig(
            data="x", classes=("a", "b"), channels=1, mean=(0.5,), std=(0.2,), aug_strength=-0.1
        )

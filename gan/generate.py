"""Generation by seed: the same seed always gives the same image (constant noise, fixed z)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from defectforge.core.errors import ConfigError
from defectforge.gan.config import GanConfig
from defectforge.gan.networks import Generator

GENERATION_BATCH = 32


def z_for_seed(seed: int, z_dim: int) -> np.ndarray:
    return np.random.RandomState(seed).randn(z_dim).astype(np.float32)


@torch.no_grad()
def generate_samples(
    generator: Generator,
    cfg: GanConfig,
    seeds: Iterable[int],
    truncation_psi: float = 1.0,
    class_index: int | Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """N x H x W x C uint8 images, one per seed, and for a generator that draws masks their
    N x H x W uint8 masks (0 background, k the k-th defect class). A conditional generator needs
    ``class_index``: one class for all seeds, or one per seed (see ``cycled_classes``)."""
    if cfg.num_classes and class_index is None:
        raise ConfigError(
            f"this generator is conditional: pass --class, one of {list(cfg.classes)}"
        )
    device = next(generator.parameters()).device
    seeds = list(seeds)
    if isinstance(class_index, int):
        class_index = [class_index] * len(seeds)
    images, masks = [], []
    for start in range(0, len(seeds), GENERATION_BATCH):
        part = seeds[start : start + GENERATION_BATCH]
        z = torch.from_numpy(np.stack([z_for_seed(s, cfg.z_dim) for s in part])).to(device)
        c = None
        if cfg.num_classes:
            labels = torch.tensor(class_index[start : start + len(part)], device=device)
            c = F.one_hot(labels, cfg.num_classes).float()
        drawn = generator(z, c, truncation_psi=truncation_psi, noise_mode="const")
        image = drawn[:, : cfg.channels]
        images.append(((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
        if cfg.mask_channels:
            masks.append(masks_of(drawn[:, cfg.channels :]).cpu())
    pictures = torch.cat(images).permute(0, 2, 3, 1).numpy()
    return pictures, (torch.cat(masks).numpy() if masks else None)


def generate_images(
    generator: Generator,
    cfg: GanConfig,
    seeds: Iterable[int],
    truncation_psi: float = 1.0,
    class_index: int | Sequence[int] | None = None,
) -> np.ndarray:
    """The images of ``generate_samples``, without masks."""
    return generate_samples(generator, cfg, seeds, truncation_psi, class_index)[0]


def masks_of(channels: torch.Tensor) -> torch.Tensor:
    """N x K x H x W mask channels (+1 a class is there, -1 it is not) -> N x H x W uint8 class
    ids: the strongest class where any channel is above zero, else background."""
    strongest, index = channels.max(dim=1)
    return torch.where(strongest > 0, index + 1, 0).to(torch.uint8)


def sample_grid(
    images: np.ndarray, masks: np.ndarray | None, mask_classes: int = 1, columns: int = 4
) -> np.ndarray:
    """The fixed-seed grid: images; with masks, each row of images followed by its row of masks
    (class k of ``mask_classes`` as grey level 255 k / K), so a reader sees whether each mask
    fits its image."""
    if masks is None:
        return image_grid(images, columns)
    levels = (masks.astype(np.uint16) * 255 // max(1, mask_classes)).astype(np.uint8)
    levels = np.repeat(levels[..., None], images.shape[-1], axis=-1)
    rows = []
    for start in range(0, len(images), columns):
        rows.append(image_grid(images[start : start + columns], columns))
        rows.append(image_grid(levels[start : start + columns], columns))
    return np.concatenate(rows)


def cycled_classes(count: int, num_classes: int) -> list[int] | None:
    """Class per image for a conditional generator's grids and metrics: every class in turn."""
    return [i % num_classes for i in range(count)] if num_classes else None


def image_grid(images: np.ndarray, columns: int = 4) -> np.ndarray:
    """Tile N x H x W x C images into one picture (missing tiles stay black)."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, c), np.uint8)
    for index, image in enumerate(images):
        r, col = divmod(index, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return grid

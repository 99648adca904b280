"""Generation by seed: the same seed always gives the same image (constant noise, fixed z)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from defectforge.datasets.errors import ConfigError
from defectforge.gan.config import GanConfig
from defectforge.gan.networks import Generator

GENERATION_BATCH = 32


def z_for_seed(seed: int, z_dim: int) -> np.ndarray:
    return np.random.RandomState(seed).randn(z_dim).astype(np.float32)


@torch.no_grad()
def generate_images(
    generator: Generator,
    cfg: GanConfig,
    seeds: Iterable[int],
    truncation_psi: float = 1.0,
    class_index: int | Sequence[int] | None = None,
) -> np.ndarray:
    """N x H x W x C uint8 images, one per seed; a conditional generator needs ``class_index``:
    one class for all seeds, or one per seed (see ``cycled_classes``)."""
    if cfg.num_classes and class_index is None:
        raise ConfigError(
            f"this generator is conditional: pass --class, one of {list(cfg.classes)}"
        )
    device = next(generator.parameters()).device
    seeds = list(seeds)
    if isinstance(class_index, int):
        class_index = [class_index] * len(seeds)
    chunks = []
    for start in range(0, len(seeds), GENERATION_BATCH):
        part = seeds[start : start + GENERATION_BATCH]
        z = torch.from_numpy(np.stack([z_for_seed(s, cfg.z_dim) for s in part])).to(device)
        c = None
        if cfg.num_classes:
            labels = torch.tensor(class_index[start : start + len(part)], device=device)
            c = F.one_hot(labels, cfg.num_classes).float()
        images = generator(z, c, truncation_psi=truncation_psi, noise_mode="const")
        chunks.append(((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(chunks).permute(0, 2, 3, 1).numpy()


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

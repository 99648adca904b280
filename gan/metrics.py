"""Image-quality distances that need no downloaded network.

Sliced Wasserstein distance (SWD) on Laplacian-pyramid patches, as Karras et al. used for ProGAN:
for each pyramid level, random 7x7 patches from both sets, normalised per channel, projected on
random unit directions; the distance is the mean absolute difference of the sorted projections.
Reported per level and averaged, x 1e3 (lower is better; identical sets give ~0).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PATCH = 7
PATCHES_PER_IMAGE = 64
DIRECTIONS = 512
REPEATS = 4
SMALLEST_LEVEL = 16
GAUSS = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


def _blur(x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    kernel = (GAUSS[:, None] * GAUSS[None, :]).to(x).expand(c, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=c)


def laplacian_pyramid(x: torch.Tensor) -> list[torch.Tensor]:
    """Band-pass levels from full resolution down to 16 px, then the 16-px low-pass residual."""
    levels = []
    while x.shape[-1] > SMALLEST_LEVEL:
        low = F.avg_pool2d(_blur(x), 2)
        levels.append(x - F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False))
        x = low
    return [*levels, x]


def _patches(level: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n, c, h, w = level.shape
    ys = torch.randint(0, h - PATCH + 1, (n, PATCHES_PER_IMAGE), generator=generator)
    xs = torch.randint(0, w - PATCH + 1, (n, PATCHES_PER_IMAGE), generator=generator)
    unfolded = F.unfold(level, PATCH)  # n x (c*49) x positions
    positions = ys * (w - PATCH + 1) + xs
    picked = unfolded.gather(2, positions[:, None, :].expand(-1, unfolded.shape[1], -1))
    return picked.permute(0, 2, 1).reshape(-1, c * PATCH * PATCH)


def _normalise(patches: torch.Tensor, channels: int) -> torch.Tensor:
    view = patches.reshape(patches.shape[0], channels, -1)
    mean = view.mean(dim=(0, 2), keepdim=True)
    std = view.std(dim=(0, 2), keepdim=True) + 1e-8
    return ((view - mean) / std).reshape(patches.shape)


def _sliced_distance(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator) -> float:
    results = []
    for _ in range(REPEATS):
        directions = torch.randn(a.shape[1], DIRECTIONS, generator=generator)
        directions /= directions.norm(dim=0, keepdim=True)
        projected_a = (a @ directions).sort(dim=0).values
        projected_b = (b @ directions).sort(dim=0).values
        results.append((projected_a - projected_b).abs().mean().item())
    return float(np.mean(results))


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """N x H x W x C uint8 -> N x C x H x W float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def sliced_wasserstein(real: np.ndarray, fake: np.ndarray, seed: int = 0) -> dict:
    """SWD x 1e3 per pyramid level (finest first) and their mean, for two uint8 NHWC sets."""
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"image sets differ in shape: {real.shape[1:]} vs {fake.shape[1:]}")
    count = min(len(real), len(fake))
    generator = torch.Generator().manual_seed(seed)
    real_levels = laplacian_pyramid(to_unit_range(real[:count]))
    fake_levels = laplacian_pyramid(to_unit_range(fake[:count]))
    channels = real.shape[-1]
    per_level = {}
    for real_level, fake_level in zip(real_levels, fake_levels, strict=True):
        a = _normalise(_patches(real_level, generator), channels)
        b = _normalise(_patches(fake_level, generator), channels)
        per_level[f"swd_{real_level.shape[-1]}"] = 1e3 * _sliced_distance(a, b, generator)
    return {**per_level, "swd": float(np.mean(list(per_level.values())))}

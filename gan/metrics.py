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

from defectforge.core.errors import DataError
from defectforge.core.files import load_state_dict_file

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


INCEPTION_SIZE = 299
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KID_SUBSET = 100


def inception_features(images: np.ndarray, weights_file: str, batch: int = 32) -> np.ndarray:
    """2048-d pool features of torchvision's Inception-v3, weights from a local file only."""
    from pathlib import Path

    from torchvision.models import inception_v3

    path = Path(weights_file)
    fix = "FID/KID need a local torchvision inception_v3 state dict (nothing is downloaded)"
    if not path.is_file():
        raise DataError(path, "Inception weights file not found", fix)
    network = inception_v3(weights=None, aux_logits=False, init_weights=False)
    state = load_state_dict_file(path, "Inception weights")
    try:
        network.load_state_dict({k: v for k, v in state.items() if not k.startswith("AuxLogits")})
    except RuntimeError:
        raise DataError(path, "the weights are not inception_v3's", fix) from None
    network.fc = torch.nn.Identity()
    network.eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    features = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(images[start : start + batch]).permute(0, 3, 1, 2).float() / 255
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear")
            features.append(network((x - mean) / std).double())
    return torch.cat(features).numpy()


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    # tr(sqrt(C_r C_f)) = sum of sqrt of the (real, non-negative) eigenvalues of C_r C_f.
    eigenvalues = torch.linalg.eigvals(torch.from_numpy(cov_r @ cov_f)).real.clamp(min=0)
    return float(
        ((mu_r - mu_f) ** 2).sum()
        + np.trace(cov_r)
        + np.trace(cov_f)
        - 2 * eigenvalues.sqrt().sum().item()
    )


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, seed: int = 0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets."""
    rng = np.random.default_rng(seed)
    size = min(KID_SUBSET, len(real), len(fake))
    dim = real.shape[1]
    scores = []
    for _ in range(10):
        x = real[rng.choice(len(real), size, replace=False)]
        y = fake[rng.choice(len(fake), size, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / dim + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (size * (size - 1))
        scores.append(off - 2 * kxy.mean())
    return float(np.mean(scores))


def inception_metrics(real: np.ndarray, fake: np.ndarray, weights_file: str) -> dict:
    real_features = inception_features(real, weights_file)
    fake_features = inception_features(fake, weights_file)
    return {
        "fid": frechet_distance(real_features, fake_features),
        "kid": kernel_inception_distance(real_features, fake_features),
    }

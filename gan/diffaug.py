"""DiffAugment (Zhao et al. 2020): differentiable colour, translation and cutout for D's input.

Pure functions ``(x, strength, generator) -> x`` on N x C x H x W tensors in [-1, 1]. Applied to
real and fake batches alike, only where the discriminator sees them, so D cannot memorise a small
set while G still learns the un-augmented distribution. ``strength`` scales every range (1 = the
paper's); a ``torch.Generator`` makes a call reproducible and lets a test apply the same transform
to two batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from defectforge.core.errors import ConfigError

Augment = Callable[[torch.Tensor, float, torch.Generator | None], torch.Tensor]


def _uniform(shape, generator, device, low=0.0, high=1.0) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def color(x: torch.Tensor, strength: float = 1.0, generator: torch.Generator | None = None):
    n, device = x.shape[0], x.device
    x = x + (_uniform((n, 1, 1, 1), generator, device) - 0.5) * strength
    if x.shape[1] == 3:
        mean = x.mean(dim=1, keepdim=True)
        saturation = 1 + (_uniform((n, 1, 1, 1), generator, device) * 2 - 1) * strength
        x = (x - mean) * saturation + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 1 + (_uniform((n, 1, 1, 1), generator, device) - 0.5) * strength
    return (x - mean) * contrast + mean


def translation(
    x: torch.Tensor,
    strength: float = 1.0,
    generator: torch.Generator | None = None,
    ratio: float = 0.125,
):
    """Shift by up to ``ratio * strength`` of the side, filling with zeros (StyleGAN's padding)."""
    n, _, h, w = x.shape
    max_x, max_y = int(w * ratio * strength + 0.5), int(h * ratio * strength + 0.5)
    if max_x == 0 and max_y == 0:
        return x
    shift_x = torch.randint(-max_x, max_x + 1, (n,), generator=generator, device=x.device)
    shift_y = torch.randint(-max_y, max_y + 1, (n,), generator=generator, device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - shift_y.view(n, 1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) - shift_x.view(n, 1, 1)
    inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).unsqueeze(1)
    index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).view(n, 1, h * w)
    shifted = x.flatten(2).gather(2, index.expand(-1, x.shape[1], -1)).view_as(x)
    return shifted * inside


def cutout(
    x: torch.Tensor,
    strength: float = 1.0,
    generator: torch.Generator | None = None,
    ratio: float = 0.5,
):
    """Zero one square of side ``ratio * strength`` of the image at a random place."""
    n, _, h, w = x.shape
    size_y, size_x = int(h * ratio * strength + 0.5), int(w * ratio * strength + 0.5)
    if size_x == 0 or size_y == 0:
        return x
    # The square's centre is uniform over the image, so it may hang over an edge (as in Zhao et al.).
    top = torch.randint(0, h + (1 - size_y % 2), (n, 1, 1), generator=generator, device=x.device)
    left = torch.randint(0, w + (1 - size_x % 2), (n, 1, 1), generator=generator, device=x.device)
    top, left = top - size_y // 2, left - size_x // 2
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    hole = (rows >= top) & (rows < top + size_y) & (cols >= left) & (cols < left + size_x)
    return x * (~hole).unsqueeze(1).to(x.dtype)


POLICIES: dict[str, Augment] = {"color": color, "translation": translation, "cutout": cutout}
COLOUR_OPS = ("color",)


def parse_policy(policy: str) -> list[str]:
    names = [p.strip() for p in policy.split(",") if p.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ConfigError(
            f"unknown DiffAugment op(s) {unknown} in {policy!r}; valid: "
            f"{', '.join(POLICIES)} (comma-separated, e.g. color,translation,cutout)"
        )
    return names


def diff_augment(
    x: torch.Tensor,
    policy: str,
    strength: float = 1.0,
    generator: torch.Generator | None = None,
    image_channels: int | None = None,
) -> torch.Tensor:
    """Apply the policy's ops in order. An empty policy or strength 0 returns ``x``.

    Channels after the first ``image_channels`` are masks drawn beside the image: they move with
    it (translation, cutout), so D still sees whether image and mask agree, but keep their
    colours, which mean classes rather than light."""
    if strength == 0:
        return x
    for name in parse_policy(policy):
        if name in COLOUR_OPS and image_channels is not None and image_channels < x.shape[1]:
            image, masks = x[:, :image_channels], x[:, image_channels:]
            x = torch.cat([POLICIES[name](image, strength, generator), masks], dim=1)
        else:
            x = POLICIES[name](x, strength, generator)
    return x

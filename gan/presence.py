"""Whether a sample holds a defect: a small classifier learnt from the real train crops only.

SWD says whether generated images look like the real ones overall; a segmentation study needs
more: generated images that hold defects. ``train_presence`` fits a small CNN to real crops (cut
as the GAN sees them) labelled by their masks, one output per defect class (a crop holds class k
when at least ``min_pixels`` of its pixels are k); ``presence_shares`` then says which share of a
generator's samples hold each class. Its accuracy on real crops of images it did not learn from
is reported with it, so a reader knows how far to trust the shares. Pure torch: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Fraction of the real images whose crops only score the classifier.
HELD_OUT_SHARE = 0.2


class PresenceClassifier(nn.Module):
    """Four strided convolutions, global average pooling, one logit per defect class."""

    def __init__(self, channels: int, classes: int, width: int = 32):
        super().__init__()
        layers, inputs = [], channels
        for outputs in (width, width, 2 * width, 2 * width):
            layers += [nn.Conv2d(inputs, outputs, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            inputs = outputs
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(inputs, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))


def presence_targets(masks: np.ndarray, classes: int, min_pixels: int) -> np.ndarray:
    """N x K float: 1 where a crop's mask holds at least ``min_pixels`` pixels of class k+1."""
    counts = np.stack([(masks == k + 1).sum(axis=(1, 2)) for k in range(classes)], axis=1)
    return (counts >= min_pixels).astype(np.float32)


def _inputs(images: np.ndarray) -> torch.Tensor:
    """N x H x W x C uint8 -> N x C x H x W float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


@dataclass
class Presence:
    """A fitted classifier, the class names it answers for, and its accuracy on held-out reals."""

    model: PresenceClassifier
    classes: tuple[str, ...]
    min_pixels: int
    held_out_accuracy: float
    real_shares: dict[str, float]

    @torch.no_grad()
    def held(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """N x K bool: which classes each image holds."""
        self.model.eval()
        logits = [self.model(_inputs(images[i : i + batch])) for i in range(0, len(images), batch)]
        return (torch.cat(logits) > 0).numpy()

    def shares(self, images: np.ndarray) -> dict[str, float]:
        """The share of ``images`` holding any defect, then each class's share."""
        return shares_of(self.held(images), self.classes)

    def state(self) -> dict:
        return {
            "weights": self.model.state_dict(),
            "classes": list(self.classes),
            "min_pixels": self.min_pixels,
            "held_out_accuracy": self.held_out_accuracy,
            "real_shares": self.real_shares,
            "channels": self.model.features[0].in_channels,
        }

    @classmethod
    def from_state(cls, state: dict) -> Presence:
        model = PresenceClassifier(state["channels"], len(state["classes"]))
        model.load_state_dict(state["weights"])
        return cls(
            model.eval(),
            tuple(state["classes"]),
            state["min_pixels"],
            state["held_out_accuracy"],
            state["real_shares"],
        )


def shares_of(held: np.ndarray, classes: tuple[str, ...]) -> dict[str, float]:
    """``defect_share`` (any class held) and ``defect_share_<class>`` of N x K presence flags."""
    shares = {"defect_share": float(held.any(axis=1).mean()) if len(held) else 0.0}
    for index, name in enumerate(classes):
        shares[f"defect_share_{name}"] = float(held[:, index].mean()) if len(held) else 0.0
    return shares


def train_presence(
    images: np.ndarray,
    masks: np.ndarray,
    groups: np.ndarray,
    classes: tuple[str, ...],
    min_pixels: int,
    steps: int = 400,
    seed: int = 0,
) -> Presence:
    """Fit the classifier to real crops (N x H x W x C uint8 images, N x H x W masks);
    ``groups`` names each crop's source image, so the held-out crops come from images the
    classifier never saw."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    targets = presence_targets(masks, len(classes), min_pixels)
    sources = np.unique(groups)
    held_out = set(rng.permutation(sources)[: max(1, int(len(sources) * HELD_OUT_SHARE))])
    test = np.isin(groups, list(held_out))
    train = ~test if (~test).any() else test
    model = PresenceClassifier(images.shape[-1], len(classes))
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = _inputs(images[train]), torch.from_numpy(targets[train])
    # Classes present in few crops still count: weigh positives by how rare they are.
    positive_weight = ((len(y) - y.sum(0)) / y.sum(0).clamp(min=1)).clamp(1, 10)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(x), (min(64, len(x)),), generator=generator)
        batch = x[pick]
        if torch.rand([], generator=generator) < 0.5:
            batch = batch.flip(3)  # a defect mirrored is still that defect
        loss = F.binary_cross_entropy_with_logits(model(batch), y[pick], pos_weight=positive_weight)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    presence = Presence(model.eval(), tuple(classes), min_pixels, 0.0, {})
    held = presence.held(images[test])
    presence.held_out_accuracy = float((held == targets[test].astype(bool)).all(axis=1).mean())
    presence.real_shares = shares_of(targets.astype(bool), tuple(classes))
    return presence

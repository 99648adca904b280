"""The one rule from an image of any size to its logits: pad, tile, blend (or resize).

The PyTorch path (``segmentation.inference``), the export runtime (``segmentation.exported``)
and so the export's check of one against the other all call ``Geometry.logits`` with a function
from network-ready images to logits; only that function differs between them.

Pad mode: an image no larger than the tile is one window, so tiling changes nothing where the
whole image fits. A larger one (in either direction: a 500 x 1,260 line scan is narrower than
a tile and more than two tiles tall) is covered by windows of at most the tile that overlap by
``overlap`` pixels. Each window is reflect-padded bottom/right to what the network takes (a
multiple of 32, at least the architecture's minimum) and its logits cropped back; they are
weighted by a window that falls off linearly towards its edges (never to zero), and the
weighted sum is divided by the summed weights, so seams are blended and a pixel seen by one
window keeps that window's logits exactly. Memory is bounded by the tile, not the image: a
4096 x 4096 image runs in the memory a 512 x 512 tile takes, plus the logits themselves.

Resize mode (a model trained on resized images): the whole image is area-resized to the one
input size and its logits resized back bilinearly.

numpy and OpenCV only: the export runtime imports this without torch or Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64
# N x h x w x C uint8 network-ready images (padded or resized) -> N x K x h x w float logits.
Network = Callable[[np.ndarray], np.ndarray]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Window starts covering ``length`` with windows of ``tile``, neighbours sharing at least
    ``overlap`` pixels; the last window ends at the edge."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    return sorted({*range(0, length - tile, step), length - tile})


def edge_weights(length: int, overlap: int) -> np.ndarray:
    """1 in the middle, falling linearly over ``overlap`` pixels to 1/(overlap+1) at both ends."""
    ramp = np.minimum(np.arange(1, length + 1), np.arange(length, 0, -1)).astype(np.float32)
    return np.minimum(ramp / (overlap + 1), 1.0) if overlap else np.ones(length, np.float32)


@dataclass(frozen=True)
class Geometry:
    """How images meet a network. ``size`` (height, width) is the network's one input size
    where it has one: resize mode, and exports of format 1 (padded to it). Otherwise windows
    are padded to a ``multiple``, at least ``min_side``."""

    resize: bool = False
    size: tuple[int, int] | None = None
    multiple: int = 1
    min_side: int = 1
    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP

    @classmethod
    def from_input_meta(cls, spec: dict, mode: str) -> Geometry:
        """The geometry an export's model.json records (``input`` and ``preprocess.mode``)."""
        size = None if "multiple" in spec else (spec["height"], spec["width"])
        return cls(
            resize=mode == "resize",
            size=size,
            multiple=spec.get("multiple", 1),
            min_side=spec.get("min_side", 1),
            tile=spec.get("tile") or min(size),
            overlap=spec.get("overlap", DEFAULT_OVERLAP),
        )

    def input_meta(self) -> dict:
        """What model.json records of this geometry, read back by ``from_input_meta``."""
        if self.size:
            return {"height": self.size[0], "width": self.size[1]}
        return {
            "multiple": self.multiple,
            "min_side": self.min_side,
            "tile": self.tile,
            "overlap": self.overlap,
        }

    def padded_shape(self, height: int, width: int) -> tuple[int, int]:
        if self.size:
            return self.size

        def side(value: int) -> int:
            return -(-max(value, self.min_side) // self.multiple) * self.multiple

        return side(height), side(width)

    def logits(self, images: np.ndarray, network: Network) -> np.ndarray:
        """N x K x H x W float32 logits of N x H x W x C uint8 images of one size."""
        if self.resize:
            return self._resized_logits(images, network)
        height, width = images.shape[1:3]
        if height <= self.tile and width <= self.tile:
            return self._padded_logits(images, network)
        tile_h, tile_w = min(self.tile, height), min(self.tile, width)
        window = np.outer(edge_weights(tile_h, self.overlap), edge_weights(tile_w, self.overlap))
        total = None
        weight = np.zeros((height, width), np.float32)
        for top in tile_starts(height, tile_h, self.overlap):
            for left in tile_starts(width, tile_w, self.overlap):
                rows, cols = slice(top, top + tile_h), slice(left, left + tile_w)
                piece = self._padded_logits(images[:, rows, cols], network)
                if total is None:
                    total = np.zeros((*piece.shape[:2], height, width), np.float32)
                total[:, :, rows, cols] += piece * window
                weight[rows, cols] += window
        return total / weight

    def _padded_logits(self, images: np.ndarray, network: Network) -> np.ndarray:
        """Reflect-pad bottom/right (as training pads), run, crop the logits back."""
        height, width = images.shape[1:3]
        padded_h, padded_w = self.padded_shape(height, width)
        padding = ((0, 0), (0, padded_h - height), (0, padded_w - width), (0, 0))
        logits = network(np.pad(images, padding, mode="reflect"))
        return logits[:, :, :height, :width].astype(np.float32, copy=False)

    def _resized_logits(self, images: np.ndarray, network: Network) -> np.ndarray:
        count, height, width, channels = images.shape
        target_h, target_w = self.size
        resized = np.stack(
            [cv2.resize(i, (target_w, target_h), interpolation=cv2.INTER_AREA) for i in images]
        ).reshape(count, target_h, target_w, channels)
        logits = network(resized).astype(np.float32, copy=False)
        return np.stack(
            [
                [cv2.resize(p, (width, height), interpolation=cv2.INTER_LINEAR) for p in planes]
                for planes in logits
            ]
        )

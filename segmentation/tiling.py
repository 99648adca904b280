"""Sliding-window inference: logits for an image of any size from windows of at most a tile.

An image no larger than the tile is one window, so tiling changes nothing where the whole image
fits. A larger one is covered by tiles that overlap by ``overlap`` pixels; each tile's logits
are weighted by a window that falls off linearly towards its edges (never to zero), and the
weighted sum is divided by the summed weights, so seams are blended and a pixel seen by one
tile keeps that tile's logits exactly. Memory is bounded by the tile, not the image: a
4096 x 4096 image runs in the memory a 512 x 512 tile takes, plus the logits themselves.

numpy only: the PyTorch path (``segmentation.inference``) and the export runtime
(``segmentation.exported``) both pass a function from an image tile to its logits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64


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


def tiled_logits(
    image: np.ndarray,
    logits_of: Callable[[np.ndarray], np.ndarray],
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
) -> np.ndarray:
    """K x H x W logits of an H x W x C image; ``logits_of`` maps an h x w x C tile to K x h x w."""
    height, width = image.shape[:2]
    if height <= tile and width <= tile:
        return logits_of(image)
    tile_h, tile_w = min(tile, height), min(tile, width)
    window = np.outer(edge_weights(tile_h, overlap), edge_weights(tile_w, overlap))
    total = None
    weight = np.zeros((height, width), np.float32)
    for top in tile_starts(height, tile_h, overlap):
        for left in tile_starts(width, tile_w, overlap):
            piece = logits_of(image[top : top + tile_h, left : left + tile_w])
            if total is None:
                total = np.zeros((piece.shape[0], height, width), np.float32)
            total[:, top : top + tile_h, left : left + tile_w] += piece * window
            weight[top : top + tile_h, left : left + tile_w] += window
    return total / weight

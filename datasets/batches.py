"""Contract rows -> model-ready arrays: decode, augment, resize or crop, pad, normalise.

Shared by the Ray path, the plain loop, evaluation and prediction, so every path feeds the model
the same pixels.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass

import cv2
import numpy as np

from defectforge.core.errors import DataError
from defectforge.datasets.augment import augment_pair, paper_augmentation
from defectforge.datasets.contract import decode_png

IGNORE_INDEX = 255
# Encoders downsample by 32; inputs are padded up to a multiple of it.
SIZE_MULTIPLE = 32


@dataclass(frozen=True)
class BatchSpec:
    """How a batch is prepared. ``image_size`` resizes (0 keeps native size); ``crop_size`` takes
    random training crops at native scale (0 uses whole images)."""

    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int = 0
    crop_size: int = 0
    aug_strength: float = 0.0
    binary: bool = False
    min_input: int = SIZE_MULTIPLE
    # Share of training crops centred on a defect pixel of their image (when it has one).
    defect_crop_prob: float = 0.0


def round_up(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    return -(-value // multiple) * multiple


def padded_side(side: int, spec: BatchSpec) -> int:
    """The network-ready side: a multiple of 32, and no smaller than the architecture needs."""
    return round_up(max(side, spec.min_input))


def resize_pair(image: np.ndarray, mask: np.ndarray | None, size: int):
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    if resized.ndim == 2:
        resized = resized[:, :, None]
    if mask is not None:
        mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    return resized, mask


def random_crop(
    image: np.ndarray,
    mask: np.ndarray,
    size: int,
    rng: np.random.Generator,
    defect_prob: float = 0.0,
):
    """A ``size`` crop: anywhere, or with probability ``defect_prob`` (when the mask has a
    defect) placed so that a randomly chosen defect pixel lies inside it, at a random offset."""
    image, mask = pad_to(image, mask, max(size, image.shape[0]), max(size, image.shape[1]))
    top_range, left_range = image.shape[0] - size, image.shape[1] - size
    defect = (mask > 0) & (mask != IGNORE_INDEX)
    if defect_prob and rng.random() < defect_prob and defect.any():
        rows, cols = np.nonzero(defect)
        pick = int(rng.integers(len(rows)))
        row, col = int(rows[pick]), int(cols[pick])
        top = int(rng.integers(max(0, row - size + 1), min(row, top_range) + 1))
        left = int(rng.integers(max(0, col - size + 1), min(col, left_range) + 1))
    else:
        top = int(rng.integers(0, top_range + 1))
        left = int(rng.integers(0, left_range + 1))
    return image[top : top + size, left : left + size], mask[top : top + size, left : left + size]


def pad_to(image: np.ndarray, mask: np.ndarray | None, height: int, width: int):
    """Reflect-pad the image bottom/right; pad the mask with IGNORE_INDEX so padding never scores."""
    dy, dx = height - image.shape[0], width - image.shape[1]
    if dy == 0 and dx == 0:
        return image, mask
    padded = cv2.copyMakeBorder(image, 0, dy, 0, dx, cv2.BORDER_REFLECT_101)
    if padded.ndim == 2:
        padded = padded[:, :, None]
    if mask is not None:
        mask = cv2.copyMakeBorder(mask, 0, dy, 0, dx, cv2.BORDER_CONSTANT, value=IGNORE_INDEX)
    return padded, mask


def normalise(images: np.ndarray, spec: BatchSpec) -> np.ndarray:
    """NHWC uint8 -> NCHW float32, standardised with the dataset's train statistics."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class BatchMaker:
    """Callable that turns a batch of PNG cells into ``{"image": NCHW float32, "mask": NHW int64}``.

    Training batches are augmented and cropped with a generator seeded by (seed, epoch, the
    batch's content), so a run with a fixed seed sees the same pixels every time, whichever
    thread of a prefetching loader prepares the batch.
    """

    def __init__(self, spec: BatchSpec, train: bool, seed: int = 0):
        self.spec = spec
        self.train = train
        self.seed = seed
        self.epoch = 0
        self._local = threading.local()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _augment(self):
        """This thread's augmentation pipeline (albumentations pipelines hold their own RNG)."""
        if not self.train or self.spec.aug_strength == 0:
            return None
        if not hasattr(self._local, "augment"):
            self._local.augment = paper_augmentation(self.spec.aug_strength)
        return self._local.augment

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        content = zlib.crc32(b"".join(bytes(cell[:64]) for cell in batch["image"]))
        rng = np.random.default_rng([self.seed, self.epoch, content])
        augment = self._augment()
        if augment is not None:
            augment.set_random_seed(int(rng.integers(2**31)))
        pairs = [
            self._prepare(img, msk, rng, augment)
            for img, msk in zip(batch["image"], batch["mask"], strict=True)
        ]
        height = padded_side(max(p[0].shape[0] for p in pairs), self.spec)
        width = padded_side(max(p[0].shape[1] for p in pairs), self.spec)
        pairs = [pad_to(image, mask, height, width) for image, mask in pairs]
        images = np.stack([p[0] for p in pairs])
        masks = np.stack([p[1] for p in pairs]).astype(np.int64)
        return {"image": normalise(images, self.spec), "mask": masks}

    def _prepare(self, image_cell: bytes, mask_cell: bytes, rng: np.random.Generator, augment):
        image = decode_png(image_cell, self.spec.channels)
        mask = decode_png(mask_cell, 0)
        if self.spec.binary:
            mask = (mask > 0).astype(np.uint8)
        if augment is not None:
            image, mask = augment_pair(augment, image, mask)
        if self.spec.image_size:
            image, mask = resize_pair(image, mask, self.spec.image_size)
        if self.train and self.spec.crop_size:
            image, mask = random_crop(
                image, mask, self.spec.crop_size, rng, self.spec.defect_crop_prob
            )
        return image, mask


# Label-preserving symmetries of the real images: none; left-right flips (StyleGAN2-ADA's
# --mirror); and up-down flips; and 90-degree turns (the eight symmetries of a square).
MIRRORS = ("none", "x", "xy", "dihedral")


def mask_channels_of(masks: np.ndarray, mask_classes: int) -> np.ndarray:
    """N x H x W class ids -> N x K x H x W float32 channels, +1 where class k is and -1
    elsewhere: the form of a generator that draws masks (ids outside 1..K count as background)."""
    classes = np.arange(1, mask_classes + 1, dtype=masks.dtype).reshape(1, -1, 1, 1)
    return np.where(masks[:, None] == classes, 1.0, -1.0).astype(np.float32)


def mirrored(image: np.ndarray, mask: np.ndarray | None, mirror: str, rng: np.random.Generator):
    """The pair under a random one of ``mirror``'s symmetries (see ``MIRRORS``), alike for both."""
    flips = []
    if mirror != "none" and rng.random() < 0.5:
        flips.append(lambda a: a[:, ::-1])
    if mirror in ("xy", "dihedral") and rng.random() < 0.5:
        flips.append(lambda a: a[::-1])
    if mirror == "dihedral" and rng.random() < 0.5:
        flips.append(lambda a: a.swapaxes(0, 1))
    for flip in flips:
        image = flip(image)
        mask = None if mask is None else flip(mask)
    if not flips:
        return image, mask
    return np.ascontiguousarray(image), None if mask is None else np.ascontiguousarray(mask)


class GanBatchMaker:
    """PNG image cells -> ``{"image": N x C x R x R float in [-1, 1], "label": N int64}``.

    Images are resized (area) to the GAN resolution, or, with ``crop_seed``, cut as random
    native-scale R x R crops (seeded), so that generated images share the real images' scale;
    with ``defect_crops`` that share of crops is placed over a defect pixel of the row's mask.
    With ``mask_classes`` K > 0 the masks travel as K more channels after the image's
    (``mask_channels_of``); ``mirror`` shows each real under a random symmetry (seeded by
    ``mirror_seed``). Labels index ``classes`` by the row's ``defect_class`` (-1 when it has
    none).
    """

    def __init__(
        self,
        channels: int,
        resolution: int,
        classes: tuple[str, ...] = (),
        crop_seed: int | None = None,
        defect_crops: float = 0.0,
        mask_classes: int = 0,
        mirror: str = "none",
        mirror_seed: int = 0,
    ):
        if mirror not in MIRRORS:
            raise ValueError(f"mirror {mirror!r} is not one of {MIRRORS}")
        self.channels, self.resolution = channels, resolution
        self.class_index = {name: index for index, name in enumerate(classes)}
        self.crop_rng = None if crop_seed is None else np.random.default_rng(crop_seed)
        self.defect_crops, self.mask_classes, self.mirror = defect_crops, mask_classes, mirror
        self.mirror_rng = np.random.default_rng(mirror_seed)

    def _mask(self, mask_cell, image: np.ndarray, origin: str | None) -> np.ndarray | None:
        if mask_cell is None:
            # No mask cell: no defect to crop over (a crop needs a mask to cut alongside).
            return None if self.crop_rng is None else np.zeros(image.shape[:2], np.uint8)
        mask = decode_png(mask_cell, 0)
        if mask.shape != image.shape[:2]:
            raise DataError(
                origin or "a GAN train row",
                f"its mask is {mask.shape[1]}x{mask.shape[0]} px and its image "
                f"{image.shape[1]}x{image.shape[0]}",
                "rebuild the dataset with `defectforge data build` (it checks mask sizes)",
            )
        return mask

    def _view(self, image: np.ndarray, mask_cell=None, origin: str | None = None):
        """The GAN's view of one row: (image, mask or None) at the GAN resolution."""
        mask = self._mask(mask_cell, image, origin)
        if self.crop_rng is None:
            return resize_pair(image, mask, self.resolution)
        return random_crop(image, mask, self.resolution, self.crop_rng, self.defect_crops)

    def pairs(self, cells, masks=None, origins=None, mirror: bool = False):
        """(N x R x R x C uint8 images, N x R x R uint8 masks or None): the GAN's view of real
        rows (``masks``: their mask cells, ``origins``: the image files they came from, named in
        errors); ``mirror``: under the maker's random symmetries."""
        masks = [None] * len(cells) if masks is None else masks
        origins = [None] * len(cells) if origins is None else origins
        views = [
            self._view(decode_png(cell, self.channels), mask, origin)
            for cell, mask, origin in zip(cells, masks, origins, strict=True)
        ]
        if mirror:
            views = [mirrored(image, mask, self.mirror, self.mirror_rng) for image, mask in views]
        images = np.stack([image for image, _ in views])
        if any(mask is None for _, mask in views):
            return images, None
        return images, np.stack([mask for _, mask in views])

    def images(self, cells, masks=None, origins=None) -> np.ndarray:
        """N x R x R x C uint8, the GAN's view of real images, unmirrored (the metric's reals)."""
        return self.pairs(cells, masks, origins)[0]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, masks = self.pairs(
            batch["image"], batch.get("mask"), batch.get("origin"), mirror=True
        )
        channels = images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1
        if self.mask_classes:
            if masks is None:
                raise ValueError("a GAN that draws masks needs the rows' mask cells")
            channels = np.concatenate([channels, mask_channels_of(masks, self.mask_classes)], 1)
        labels = [self.class_index.get(name, -1) for name in batch.get("defect_class", [])]
        return {
            "image": np.ascontiguousarray(channels),
            "label": np.asarray(labels or [-1] * len(images), np.int64),
        }

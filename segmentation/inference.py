"""Inference on image files of any size: predict masks, evaluate against masks on disk."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from defectforge.datasets.batches import BatchSpec, normalise, pad_to, padded_side
from defectforge.datasets.contract import write_png
from defectforge.datasets.errors import DataError
from defectforge.datasets.outputs import check_output, publish_dir
from defectforge.datasets.readers import list_images, read_image, read_mask
from defectforge.datasets.samples import SampleSpec
from defectforge.segmentation.checkpoint import load_model
from defectforge.segmentation.metrics import MetricAccumulator
from defectforge.segmentation.overlay import overlay


@torch.no_grad()
def predict_batch_logits(model: nn.Module, spec: BatchSpec, images: np.ndarray) -> torch.Tensor:
    """N x K x H x W logits for N images of one size (N x H x W x C uint8), at that size: resized
    or padded for the network as in training, then brought back."""
    count, height, width = images.shape[:3]
    if spec.image_size:
        side = spec.image_size
        network_input = np.stack(
            [cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA) for image in images]
        ).reshape(count, side, side, -1)
    else:
        network_input = np.stack(
            [
                pad_to(image, None, padded_side(height, spec), padded_side(width, spec))[0]
                for image in images
            ]
        )
    device = next(model.parameters()).device
    logits = model(torch.from_numpy(normalise(network_input, spec)).to(device)).float()
    if spec.image_size:
        return F.interpolate(logits, size=(height, width), mode="bilinear").cpu()
    return logits[:, :, :height, :width].cpu()


def predict_logits(model: nn.Module, spec: BatchSpec, image: np.ndarray) -> torch.Tensor:
    """K x H x W logits for one image of any size."""
    return predict_batch_logits(model, spec, image[None])[0]


def _mask_for(image: Path, masks: Path) -> Path:
    for suffix in (".png", ".bmp", ".tif", ".tiff"):
        candidate = masks / f"{image.stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise DataError(
        image,
        f"no mask named {image.stem}.png in {masks}",
        "give every image a mask with the same stem",
    )


def evaluate_folder(
    model_dir: str | Path,
    images: str | Path,
    masks: str | Path,
    binary: bool = False,
    mask_threshold: int | None = None,
) -> dict:
    """Metrics over every image of a folder, at native resolution."""
    model, cfg = load_model(model_dir)
    spec = cfg.batch_spec()
    classes = cfg.output_classes
    # Masks on disk carry the dataset's classes; a binary model's masks are binarised after the check.
    mask_spec = SampleSpec(
        "eval", tuple(cfg.classes), cfg.channels, binary=cfg.binary, mask_threshold=mask_threshold
    )
    names = ["background", "defect"] if binary else list(classes)
    accumulator = MetricAccumulator(len(names))
    for path in tqdm(list_images(images), desc="evaluate", unit="img"):
        image = read_image(path, cfg.channels)
        truth = read_mask(_mask_for(path, Path(masks)), image.shape[:2], mask_spec, None)
        pred = predict_logits(model, spec, image).argmax(0)
        truth_t = torch.from_numpy(truth.astype(np.int64))
        if binary:
            pred, truth_t = (pred > 0).long(), (truth_t > 0).long()
        accumulator.update(pred[None], truth_t[None])
    return accumulator.summary(names)


def predict_folder(
    model_dir: str | Path, images: str | Path, out: str | Path, overwrite: bool = False
) -> int:
    """Write ``<stem>_mask.png`` (class ids) and ``<stem>_overlay.png`` for every image."""
    check_output(out, overwrite, (images, model_dir))
    model, cfg = load_model(model_dir)
    paths = list_images(images)
    with publish_dir(out, overwrite, inputs=(images, model_dir), kind="predictions") as staging:
        for path in tqdm(paths, desc="predict", unit="img"):
            image = read_image(path, cfg.channels)
            logits = predict_logits(model, cfg.batch_spec(), image)
            mask = logits.argmax(0).numpy().astype(np.uint8)
            write_png(staging / f"{path.stem}_mask.png", mask)
            write_png(staging / f"{path.stem}_overlay.png", overlay(image, mask))
    return len(paths)

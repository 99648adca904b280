"""Inference on image files of any size: predict masks, evaluate against masks on disk."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from defectforge.core.errors import DataError
from defectforge.core.outputs import PREDICTIONS, check_output
from defectforge.core.storage import Location
from defectforge.datasets.batches import SIZE_MULTIPLE, BatchSpec, normalise
from defectforge.datasets.contract import (
    MANIFEST,
    decode_png,
    read_parquet,
    split_files,
    split_location,
)
from defectforge.datasets.images import DEFAULT_MAX_PIXELS
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.readers import list_images, read_image, read_mask
from defectforge.datasets.samples import SampleSpec
from defectforge.segmentation.checkpoint import load_model
from defectforge.segmentation.config import SegConfig
from defectforge.segmentation.decisions import OperatingPoint, findings, softmax, verdict_counts
from defectforge.segmentation.metrics import MetricAccumulator, auroc
from defectforge.segmentation.predictions import (
    image_samples,
    operating_point,
    stored_operating_point,
    write_predictions,
)
from defectforge.segmentation.tiling import Geometry, Network


def network_geometry(spec: BatchSpec) -> Geometry:
    """The geometry a model trained with ``spec`` takes images in: resized to its one size, or
    at native scale padded to a multiple of 32 (at least the architecture's minimum) and tiled.
    An export records it in model.json, so its runtime follows the same rule."""
    if spec.image_size:
        return Geometry(resize=True, size=(spec.image_size, spec.image_size))
    return Geometry(multiple=SIZE_MULTIPLE, min_side=spec.min_input)


def network_of(model: nn.Module, spec: BatchSpec) -> Network:
    """The model as ``Geometry.logits`` runs it: network-ready uint8 images, normalised here."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(images: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(normalise(images, spec)).to(device)).float().cpu().numpy()

    return run


def predict_batch_logits(model: nn.Module, spec: BatchSpec, images: np.ndarray) -> torch.Tensor:
    """N x K x H x W logits for N images of one size (N x H x W x C uint8), at that size."""
    return torch.from_numpy(network_geometry(spec).logits(images, network_of(model, spec)))


def predict_logits(model: nn.Module, spec: BatchSpec, image: np.ndarray) -> torch.Tensor:
    """K x H x W logits for one image of any size."""
    return predict_batch_logits(model, spec, image[None])[0]


def image_probabilities(model: nn.Module, spec: BatchSpec, image: np.ndarray) -> np.ndarray:
    """K x H x W class probabilities for one image of any size."""
    return softmax(predict_logits(model, spec, image).numpy())


def _mask_for(image: Path, masks: Path, suffix: str) -> Path | None:
    for extension in (".png", ".bmp", ".tif", ".tiff"):
        candidate = masks / f"{image.stem}{suffix}{extension}"
        if candidate.is_file() and candidate != image:
            return candidate
    return None


def run_operating_point(model_dir: str | Path) -> OperatingPoint:
    """The run's calibrated operating point, or the default one."""
    return operating_point(stored_operating_point(model_dir), None, None)


def evaluate_pairs(
    model: nn.Module,
    cfg: SegConfig,
    point: OperatingPoint,
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    binary: bool = False,
    per_image: bool = False,
) -> dict:
    """Pixel metrics over (image, true mask) pairs at native resolution, and image-level ones:
    AUROC of the image score (its highest defect probability) and the verdicts at ``point``
    against the truth (an image whose true mask has a defect should be NG); with ``per_image``
    also each image's binary defect IoU, in the pairs' order."""
    names = ["background", "defect"] if binary else list(cfg.output_classes)
    accumulator = MetricAccumulator(len(names))
    scores, defective, verdicts = [], [], []
    for image, truth in pairs:
        probabilities = image_probabilities(model, cfg.batch_spec(), image)
        pred = torch.from_numpy(probabilities.argmax(0).astype(np.int64))
        truth_t = torch.from_numpy(truth.astype(np.int64))
        if binary or cfg.binary:
            truth_t = (truth_t > 0).long()
        if binary:
            pred = (pred > 0).long()
        accumulator.update(pred[None], truth_t[None])
        row = findings(probabilities, cfg.output_classes, point)
        scores.append(row["max_defect_probability"])
        defective.append(bool(truth.any()))
        verdicts.append(row["verdict"])
    counts = verdict_counts(verdicts, defective)
    image_level = {
        "images": len(verdicts),
        "image_auroc": auroc(scores, defective),
        "operating_point": asdict(point),
        "recall": counts["true_ng"] / max(1, counts["true_ng"] + counts["missed_ng"]),
        "false_alarm_rate": counts["false_ng"] / max(1, counts["false_ng"] + counts["true_ok"]),
        "verdicts": counts,
    }
    if per_image:
        image_level["per_image_binary_iou"] = accumulator.per_image_iou()
    return {**accumulator.summary(names), **image_level}


def evaluate_folder(
    model_dir: str | Path,
    images: str | Path,
    masks: str | Path,
    binary: bool = False,
    mask_threshold: int | None = None,
    mask_suffix: str = "",
    missing_mask_is_background: bool = False,
) -> dict:
    """``evaluate_pairs`` over a folder of images and one of masks (same stem, or a suffix)."""
    model, cfg = load_model(model_dir)
    # Masks on disk carry the dataset's classes; a binary model's masks are binarised after the check.
    mask_spec = SampleSpec(
        "eval",
        tuple(cfg.classes),
        cfg.channels,
        binary=cfg.binary or binary,
        mask_threshold=mask_threshold,
    )

    def pairs():
        for path in tqdm(list_images(images, mask_suffix), desc="evaluate", unit="img"):
            image = read_image(path, cfg.channels, input_bits=cfg.input_bits)
            truth = _truth(
                path,
                Path(masks),
                image.shape[:2],
                mask_spec,
                mask_suffix,
                missing_mask_is_background,
            )
            yield image, truth

    return evaluate_pairs(model, cfg, run_operating_point(model_dir), pairs(), binary)


def run_dataset(cfg: SegConfig) -> Manifest:
    """The manifest of the dataset a run was trained on, refused if the dataset is not here or
    was rebuilt since the run trained (its splits may now hold the run's training images)."""
    if not (Location.of(cfg.data) / MANIFEST).is_file():
        raise DataError(
            Location.of(cfg.data),
            "the run's dataset is not here",
            "run this where the dataset the run was trained on is",
        )
    manifest = Manifest.load(cfg.data)
    if cfg.data_manifest_id and manifest.dataset_id != cfg.data_manifest_id:
        raise DataError(
            Location.of(cfg.data) / MANIFEST,
            f"this dataset was rebuilt since the run trained on it (id {manifest.dataset_id}, "
            f"the run's {cfg.data_manifest_id}), so its splits may hold images the run learnt "
            "from",
            "train the run again on this dataset, or score it on folders (`seg eval --images "
            "--masks`)",
        )
    return manifest


def dataset_split_pairs(
    cfg: SegConfig, split: str, desc: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Decoded (image, mask) pairs of one split of the dataset a run was trained on
    (``run_dataset``'s checks first)."""
    manifest = run_dataset(cfg)
    files = split_files(cfg.data, split)
    if not files:
        built = manifest.split_total(split) == 0
        share = "--test-fraction (NEU-Seg) or " if split == "test" else ""
        raise DataError(
            split_location(cfg.data, split),
            f"the run's dataset has no {split} split"
            + (" (it was built without one)" if built else " here"),
            f"build it with {share}--split-ratios giving {split} a share"
            if built
            else "run this where the dataset the run was trained on is",
        )
    table = read_parquet(files, columns=["image", "mask"])
    cells = zip(table["image"].to_pylist(), table["mask"].to_pylist(), strict=True)
    for image, mask in tqdm(cells, total=table.num_rows, desc=desc, unit="img"):
        yield decode_png(image, cfg.channels), decode_png(mask, 0)


def evaluate_dataset_split(
    model_dir: str | Path, split: str, binary: bool = False, per_image: bool = False
) -> dict:
    """``evaluate_pairs`` over one split of the dataset the run was trained on."""
    model, cfg = load_model(model_dir)
    pairs = dataset_split_pairs(cfg, split, f"evaluate {split}")
    return evaluate_pairs(model, cfg, run_operating_point(model_dir), pairs, binary, per_image)


def _truth(path, masks, shape, spec, suffix, missing_is_background) -> np.ndarray:
    mask = _mask_for(path, masks, suffix)
    if mask is None:
        if missing_is_background:
            return np.zeros(shape, np.uint8)
        raise DataError(
            path,
            f"no mask named {path.stem}{suffix}.png (or .bmp, .tif) in {masks}",
            "give every image a mask with the same stem (--mask-suffix for a suffix), or pass "
            "--missing-mask background if images without one are defect-free",
        )
    return read_mask(mask, shape, spec, None)


def predict_folder(
    model_dir: str | Path,
    images: str | Path,
    out: str | Path,
    overwrite: bool = False,
    threshold: float | None = None,
    min_area: int | None = None,
    mask_suffix: str = "",
    skip_bad: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    heatmaps: bool = False,
) -> list[dict]:
    """Masks, overlays and predictions.csv (verdicts at the run's calibrated operating point,
    or the default, with ``threshold``/``min_area`` on top) for every image of a folder; bad
    images stop it, or with ``skip_bad`` are listed in rejected.csv."""
    check_output(out, overwrite, (images, model_dir), kind=PREDICTIONS)
    model, cfg = load_model(model_dir)
    point = operating_point(stored_operating_point(model_dir), threshold, min_area)
    return write_predictions(
        image_samples(images, cfg.channels, mask_suffix, max_pixels, cfg.input_bits),
        lambda image, _: image_probabilities(model, cfg.batch_spec(), image),
        cfg.output_classes,
        point,
        out,
        overwrite,
        (images, model_dir),
        skip_bad,
        heatmaps,
    )

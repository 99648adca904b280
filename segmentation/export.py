"""Export a trained model as TorchScript and ONNX, checked against PyTorch before it is written.

The exported graph takes raw pixels (N x C x H x W float32, 0-255) and returns logits: the
dataset's normalisation is inside it, so deployment code cannot get it wrong. ``model.json``
records everything else a user of the export needs (classes, input size, resize or pad rule,
metrics, lineage). Nothing is published unless both runtimes match PyTorch on the given images.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from defectforge.core.outputs import EXPORT, check_output, publish_dir
from defectforge.core.storage import Location
from defectforge.datasets.batches import BatchSpec
from defectforge.datasets.contract import decode_png, file_digest, read_split_table
from defectforge.datasets.manifest import Manifest
from defectforge.segmentation.checkpoint import load_model, unwrap
from defectforge.segmentation.config import SegConfig
from defectforge.segmentation.exported import (
    EXPORT_FORMAT,
    MODEL_JSON,
    ONNX_FILE,
    RUNTIMES,
    TORCHSCRIPT_FILE,
    ExportedModel,
)
from defectforge.segmentation.inference import network_geometry, predict_batch_logits
from defectforge.segmentation.predictions import stored_operating_point
from defectforge.segmentation.tiling import Geometry

FORMAT_VERSION = 2
SMP_FOLDER = "smp"
# Exported graphs take any height and width up to this (larger images are tiled anyway).
MAX_SIDE = 8192
EXAMPLE_SIDE = 256
# Exported logits may differ from PyTorch's by float rounding only: this share of their scale.
RELATIVE_TOLERANCE = 1e-3
VERIFY_IMAGES = 8


class ExportMismatch(RuntimeError):
    """The exported graph computes something else than the model: a bug, never a user's."""


class PixelsToLogits(nn.Module):
    """A trained network behind the dataset's normalisation: raw 0-255 pixels in, logits out."""

    def __init__(self, network: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.network = network
        self.register_buffer("offset", torch.tensor(mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("scale", torch.tensor(std).view(1, -1, 1, 1) * 255.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network((pixels - self.offset) / self.scale)


def _example_and_dims(cfg: SegConfig, geometry: Geometry) -> tuple[torch.Tensor, dict]:
    """An example input to trace, and the ONNX graph's dynamic dimensions: any height and width
    that are multiples of the geometry's (and at least its minimum side) in pad mode; the one
    training size in resize mode. The batch is always free."""
    if geometry.size:
        return torch.zeros(1, cfg.channels, *geometry.size), {0: torch.export.Dim("batch")}
    multiple = geometry.multiple
    low = max(1, -(-geometry.min_side // multiple))
    height = torch.export.Dim(f"height_{multiple}", min=low, max=MAX_SIDE // multiple)
    width = torch.export.Dim(f"width_{multiple}", min=low, max=MAX_SIDE // multiple)
    side = max(EXAMPLE_SIDE, low * multiple)
    dims = {0: torch.export.Dim("batch"), 2: multiple * height, 3: multiple * width}
    return torch.zeros(1, cfg.channels, side, side), dims


def _input_meta(geometry: Geometry) -> dict:
    limit = {} if geometry.size else {"max_side": MAX_SIDE}
    return {
        **geometry.input_meta(),
        **limit,
        "layout": "NCHW",
        "dtype": "float32",
        "pixel_range": [0, 255],
    }


def _write_torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        # torch.jit is deprecated upstream but remains the one-file runtime without Python deps.
        warnings.simplefilter("ignore")
        torch.jit.trace(module, example).save(str(path))


def _write_onnx(module: nn.Module, example: torch.Tensor, dims: dict, path: Path) -> None:
    # The exporter prints its stages to stdout; the caller prints one line for the whole export.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_shapes=(dims,),
            external_data=False,
            verbose=False,
        )


def _max_differences(folder: Path, reference: np.ndarray, images: np.ndarray) -> dict[str, float]:
    return {
        runtime: float(np.abs(ExportedModel(folder, runtime).logits(images) - reference).max())
        for runtime in RUNTIMES
    }


def verification_images(cfg: SegConfig) -> np.ndarray:
    """Up to VERIFY_IMAGES real validation images of the split's most common size."""
    val = read_split_table(cfg.data, "val", columns=["image", "height", "width"])
    shapes = list(zip(val["height"].to_pylist(), val["width"].to_pylist(), strict=True))
    common = max(set(shapes), key=shapes.count)
    cells = [c for c, s in zip(val["image"].to_pylist(), shapes, strict=True) if s == common]
    return np.stack([decode_png(cell, cfg.channels) for cell in cells[:VERIFY_IMAGES]])


def input_conversion(data: str) -> dict:
    """What an export must record for `predict` to turn raw input into what the model saw: for
    steel, the rule from a rig's maps or captures to the RGB image."""
    build = Manifest.load(data).config or {}
    return {"steel": build["steel"]} if build.get("source") == "steel" else {}


def export_run(
    model: nn.Module,
    cfg: SegConfig,
    out: str | Path,
    details: dict,
    overwrite: bool = False,
    inputs: tuple = (),
) -> dict:
    """Export a trained model, checked on real validation images of its own dataset."""
    details = {**details, **input_conversion(cfg.data)}
    return export_model(model, cfg, verification_images(cfg), out, details, overwrite, inputs)


def export_trained_run(run: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """`seg export`: a `seg train` run's model with its validation metrics."""
    check_output(out, overwrite, (run,), kind=EXPORT)
    model, cfg = load_model(run)
    metrics_file = Location.of(run) / "metrics.json"
    best = metrics_file.read_json()["best"] if metrics_file.is_file() else {}
    details = {
        "metrics": {"val_binary_defect_iou": best.get("val_binary_defect_iou"), "chosen": "run"},
        "run": Location.of(run).uri,
        "data": {"real_manifest_id": cfg.data_manifest_id, "synthetic_ratio": cfg.synthetic_ratio},
    }
    point = stored_operating_point(run)
    if point:
        details["operating_point"] = point
    return export_run(model, cfg, out, details, overwrite, inputs=(run,))


def export_model(
    model: nn.Module,
    cfg: SegConfig,
    images: np.ndarray,
    out: str | Path,
    details: dict,
    overwrite: bool = False,
    inputs: tuple = (),
) -> dict:
    """Write ``out`` with TorchScript, ONNX, model.json and the network for
    ``smp.from_pretrained`` (``smp/``), after checking both exports against the PyTorch pipeline
    on ``images`` (N x H x W x C uint8, real images of one size).

    ``details`` (metrics, study, data lineage, operating point) goes into model.json as given.
    """
    model = model.cpu().eval()
    module = PixelsToLogits(model, cfg.mean, cfg.std).eval()
    spec: BatchSpec = cfg.batch_spec()
    geometry = network_geometry(spec)
    example, dims = _example_and_dims(cfg, geometry)
    # The reference runs the geometry the export records, so only the graphs are compared.
    reference = predict_batch_logits(model, spec, images).numpy()
    meta = {
        "format": EXPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        "classes": list(cfg.output_classes),
        "channels": cfg.channels,
        "input_bits": cfg.input_bits,
        "input": _input_meta(geometry),
        "preprocess": {
            "mode": "resize" if geometry.resize else "pad",
            "rule": "area-resize to the input, logits resized back bilinearly"
            if geometry.resize
            else "windows of at most the tile (one for an image that fits, else overlapping "
            "and blended), each reflect-padded bottom/right to a multiple of `multiple` (at "
            "least `min_side`), logits cropped back",
        },
        "normalisation": {"mean": list(cfg.mean), "std": list(cfg.std), "in_graph": True},
        "files": {"torchscript": TORCHSCRIPT_FILE, "onnx": ONNX_FILE, "smp": SMP_FOLDER},
        "architecture": cfg.arch,
        "encoder": cfg.encoder,
        "training_config": json.loads(cfg.to_json()),
        "versions": {"torch": torch.__version__},
        **details,
    }
    with publish_dir(out, overwrite, inputs, kind=EXPORT) as staging:
        with torch.no_grad():
            _write_torchscript(module, example, staging / TORCHSCRIPT_FILE)
            _write_onnx(module, example, dims, staging / ONNX_FILE)
        # Which model files this model.json describes: a file swapped in is refused at load.
        meta["sha256"] = {
            name: file_digest(staging / name) for name in (TORCHSCRIPT_FILE, ONNX_FILE)
        }
        # The bare network (normalisation not included) for smp.from_pretrained.
        unwrap(model).save_pretrained(str(staging / SMP_FOLDER))
        # ExportedModel reads model.json for the input size and rule; write it before checking.
        (staging / MODEL_JSON).write_text(json.dumps(meta, indent=2))
        differences = _max_differences(staging, reference, images)
        limit = RELATIVE_TOLERANCE * max(1.0, float(np.abs(reference).max()))
        meta["verification"] = {
            "images": len(images),
            "max_abs_logit_difference": differences,
            "tolerance": limit,
        }
        if max(differences.values()) > limit:
            raise ExportMismatch(
                f"export differs from PyTorch by {differences} (tolerance {limit:.2g}); "
                "nothing was written"
            )
        (staging / MODEL_JSON).write_text(json.dumps(meta, indent=2))
    return meta

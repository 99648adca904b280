"""Running an exported model (TorchScript or ONNX) with its ``model.json`` alone.

This module is the deployment side: it imports numpy, OpenCV and either torch (TorchScript) or
onnxruntime (ONNX) — never Ray or segmentation-models-pytorch — so a production line needs only
the export folder. Normalisation is inside the exported graph (raw 0-255 pixels in, logits out);
the resize or padding rule of training is applied here, as written in ``model.json``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np

from defectforge.datasets.contract import write_png
from defectforge.datasets.errors import ConfigError, DataError
from defectforge.datasets.outputs import check_output, publish_dir
from defectforge.datasets.readers import list_images, read_image
from defectforge.datasets.steel import (
    SteelOptions,
    read_steel_image,
    sample_name,
    steel_sample_folders,
)
from defectforge.segmentation.overlay import overlay

EXPORT_FORMAT = "defectforge-export"
MODEL_JSON = "model.json"
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
RUNTIMES = ("onnx", "torchscript")
EXPORT_FIX = "export the model again (`seg export` or `study export`)"
CHUNK = 8


def is_export(folder: str | Path) -> bool:
    return (Path(folder) / MODEL_JSON).is_file()


def read_model_json(folder: str | Path) -> dict:
    path = Path(folder) / MODEL_JSON
    if not path.is_file():
        raise DataError(path, "no model.json: not a defectforge export", EXPORT_FIX)
    try:
        meta = json.loads(path.read_text())
    except ValueError:
        raise DataError(path, "model.json is not valid JSON", EXPORT_FIX) from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise DataError(path, "not a defectforge export's model.json", EXPORT_FIX)
    return meta


class ExportedModel:
    """Logits and masks from an export folder, for images of the export's channel count."""

    def __init__(self, folder: str | Path, runtime: str = "onnx"):
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
        self.folder = Path(folder)
        self.meta = read_model_json(self.folder)
        self.height = self.meta["input"]["height"]
        self.width = self.meta["input"]["width"]
        self.resize = self.meta["preprocess"]["mode"] == "resize"
        try:
            self._run = self._torchscript() if runtime == "torchscript" else self._onnx()
        except ImportError:
            raise
        except Exception:  # noqa: BLE001 - each runtime has its own error types for a bad file
            name = TORCHSCRIPT_FILE if runtime == "torchscript" else ONNX_FILE
            raise DataError(
                self.folder / name, f"the {runtime} model cannot be loaded (damaged?)", EXPORT_FIX
            ) from None

    @property
    def channels(self) -> int:
        return self.meta["channels"]

    def _torchscript(self):
        import torch

        with warnings.catch_warnings():
            # Deprecated upstream in favour of torch.export, which needs Python model code.
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(self.folder / TORCHSCRIPT_FILE), map_location="cpu")
        module.eval()

        def run(pixels: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(pixels)).numpy()

        return run

    def _onnx(self):
        import onnxruntime

        session = onnxruntime.InferenceSession(
            str(self.folder / ONNX_FILE), providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name
        return lambda pixels: session.run(None, {name: pixels})[0]

    def _network_input(self, image: np.ndarray, source: str) -> np.ndarray:
        height, width = image.shape[:2]
        if self.resize:
            image = cv2.resize(image, (self.width, self.height), interpolation=cv2.INTER_AREA)
        elif height > self.height or width > self.width:
            raise DataError(
                source,
                f"image is {height}x{width}, larger than the export's input "
                f"{self.height}x{self.width}",
                "crop it, or export a model trained with image_size (resize mode)",
            )
        else:
            image = cv2.copyMakeBorder(
                image, 0, self.height - height, 0, self.width - width, cv2.BORDER_REFLECT_101
            )
        return image.reshape(self.height, self.width, -1)

    def _back_to_image(self, logits: np.ndarray, height: int, width: int) -> np.ndarray:
        if not self.resize:
            return logits[:, :height, :width]
        planes = [cv2.resize(p, (width, height), interpolation=cv2.INTER_LINEAR) for p in logits]
        return np.stack(planes)

    def logits(self, images: np.ndarray, source: str = "images") -> np.ndarray:
        """N x K x H x W float32 logits for N x H x W x C uint8 images of one size."""
        if images.ndim != 4 or images.shape[3] != self.channels:
            raise DataError(
                source,
                f"expected N x H x W x {self.channels} images, got shape {images.shape}",
                f"give {self.channels}-channel images",
            )
        height, width = images.shape[1:3]
        pixels = np.stack([self._network_input(image, source) for image in images])
        pixels = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
        out = np.concatenate(
            [self._run(pixels[i : i + CHUNK]) for i in range(0, len(pixels), CHUNK)]
        )
        return np.stack([self._back_to_image(plane, height, width) for plane in out])

    def predict(self, image: np.ndarray, source: str = "image") -> np.ndarray:
        """H x W uint8 class ids for one H x W x C image."""
        return self.logits(image[None], source)[0].argmax(0).astype(np.uint8)


def predict_folder_exported(
    model: str | Path,
    images: str | Path,
    out: str | Path,
    runtime: str = "onnx",
    overwrite: bool = False,
) -> int:
    """Write ``<stem>_mask.png`` and ``<stem>_overlay.png`` per image, from the export alone."""
    check_output(out, overwrite, (images, model))
    exported = ExportedModel(model, runtime)
    steel = exported.meta.get("steel")
    samples = _steel_samples(images, steel) if steel else _image_files(images, exported.channels)
    count = 0
    with publish_dir(out, overwrite, inputs=(images, model), kind="predictions") as staging:
        for name, source, read in samples:
            image = read()
            mask = exported.predict(image, source)
            write_png(staging / f"{name}_mask.png", mask)
            write_png(staging / f"{name}_overlay.png", overlay(image, mask))
            count += 1
    return count


def _image_files(images: str | Path, channels: int) -> list:
    return [
        (path.stem, str(path), lambda path=path: read_image(path, channels))
        for path in list_images(images)
    ]


def _steel_samples(images: str | Path, steel: dict):
    """Steel sample folders (maps or raw captures + lights.json), converted to RGB by the rule
    the training data was built with, as the export recorded it."""
    options = SteelOptions.from_dict(steel)
    root = Path(images)
    return [
        (
            sample_name(folder, root),
            str(folder),
            lambda f=folder: read_steel_image(f, root, options),
        )
        for folder in steel_sample_folders(root)
    ]

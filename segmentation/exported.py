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

import numpy as np

from defectforge.core.errors import ConfigError, DataError, UserError
from defectforge.core.outputs import PREDICTIONS, check_output
from defectforge.core.storage import Location, local_folder
from defectforge.datasets.images import DEFAULT_MAX_PIXELS
from defectforge.datasets.steel import (
    SteelOptions,
    read_steel_image,
    sample_name,
    steel_sample_folders,
)
from defectforge.segmentation.decisions import softmax
from defectforge.segmentation.predictions import (
    image_samples,
    operating_point,
    write_predictions,
)
from defectforge.segmentation.tiling import Geometry

EXPORT_FORMAT = "defectforge-export"
MODEL_JSON = "model.json"
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
RUNTIMES = ("onnx", "torchscript")
EXPORT_FIX = "export the model again (`seg export` or `study export`)"


def is_export(folder: str | Path) -> bool:
    """Whether the folder (local or on a store) holds an export's ``model.json``."""
    return (Location.of(folder) / MODEL_JSON).is_file()


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


def onnx_session(path: Path, providers: list[str]):
    """An ONNX Runtime session whose CPU threads sleep between operations rather than spin:
    predict's reading and writing thread then works in those gaps (the graph alone runs as fast:
    12.55-13.05 s vs 12.68-12.86 s spinning for 300 NEU images, 2 cores)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)


class ExportedModel:
    """Logits, probabilities and masks from an export folder, for images of any size with the
    export's channel count: padded to what the graph takes, tiled above its tile size, or
    resized whole for a model trained on resized images."""

    def __init__(self, folder: str | Path, runtime: str = "onnx", device: str = "cpu"):
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
        self.folder = local_folder(folder)
        self.meta = read_model_json(self.folder)
        # Format 1 exports take one fixed size; format 2 any multiple of ``multiple``.
        self.geometry = Geometry.from_input_meta(
            self.meta["input"], self.meta["preprocess"]["mode"]
        )
        try:
            loader = self._torchscript if runtime == "torchscript" else self._onnx
            self._run = loader(device)
        except (ImportError, UserError):
            raise
        except Exception:  # noqa: BLE001 - each runtime has its own error types for a bad file
            name = TORCHSCRIPT_FILE if runtime == "torchscript" else ONNX_FILE
            raise DataError(
                self.folder / name, f"the {runtime} model cannot be loaded (damaged?)", EXPORT_FIX
            ) from None

    @property
    def channels(self) -> int:
        return self.meta["channels"]

    @property
    def input_bits(self) -> int:
        """Bits per value of the images it reads (exports made before these were read: 8)."""
        return self.meta.get("input_bits", 8)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.meta["classes"])

    def _torchscript(self, device: str):
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise DataError(
                self.folder / TORCHSCRIPT_FILE,
                "PyTorch here sees no CUDA GPU",
                "run it on a machine with one (a CUDA build of torch), or pass --device cpu",
            )
        with warnings.catch_warnings():
            # Deprecated upstream in favour of torch.export, which needs Python model code.
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(self.folder / TORCHSCRIPT_FILE), map_location=device)
        module.eval()

        def run(pixels: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(pixels).to(device)).cpu().numpy()

        return run

    def _onnx(self, device: str):
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise DataError(
                    self.folder / ONNX_FILE,
                    "onnxruntime here has no CUDA provider",
                    "pip uninstall onnxruntime, then pip install 'defectforge[gpu]' (onnxruntime-gpu); "
                    "or --device cpu",
                )
            providers = ["CUDAExecutionProvider", *providers]
        session = onnx_session(self.folder / ONNX_FILE, providers)
        name = session.get_inputs()[0].name
        return lambda pixels: session.run(None, {name: pixels})[0]

    def _network(self, images: np.ndarray) -> np.ndarray:
        """The graph as ``Geometry.logits`` runs it: NHWC uint8 in, NCHW float32 pixels to it."""
        pixels = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
        return self._run(pixels)

    def logits(self, images: np.ndarray, source: str = "images") -> np.ndarray:
        """N x K x H x W logits for N x H x W x C images of one size."""
        if images.ndim != 4 or images.shape[3] != self.channels:
            raise DataError(
                source,
                f"expected H x W x {self.channels} images, got shape {images.shape[1:]}",
                f"give {self.channels}-channel images",
            )
        return self.geometry.logits(images, self._network)

    def image_logits(self, image: np.ndarray, source: str = "image") -> np.ndarray:
        """K x H x W logits for one H x W x C image of any size."""
        return self.logits(image[None], source)[0]

    def probabilities(self, image: np.ndarray, source: str = "image") -> np.ndarray:
        return softmax(self.image_logits(image, source))

    def predict(self, image: np.ndarray, source: str = "image") -> np.ndarray:
        """H x W uint8 class ids for one H x W x C image."""
        return self.image_logits(image, source).argmax(0).astype(np.uint8)


def predict_folder_exported(
    model: str | Path,
    images: str | Path,
    out: str | Path,
    runtime: str = "onnx",
    overwrite: bool = False,
    threshold: float | None = None,
    min_area: int | None = None,
    device: str = "cpu",
    mask_suffix: str = "",
    skip_bad: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    heatmaps: bool = False,
) -> list[dict]:
    """Masks, overlays and predictions.csv per image (or steel sample), from the export alone;
    verdicts at the export's operating point, with ``threshold``/``min_area`` on top; bad
    images stop it, or with ``skip_bad`` are listed in rejected.csv."""
    check_output(out, overwrite, (images, model), kind=PREDICTIONS)
    exported = ExportedModel(model, runtime, device)
    steel = exported.meta.get("steel")
    if steel:
        samples = _steel_samples(images, steel)
    else:
        samples = image_samples(
            images, exported.channels, mask_suffix, max_pixels, exported.input_bits
        )
    point = operating_point(exported.meta.get("operating_point"), threshold, min_area)
    return write_predictions(
        samples,
        exported.probabilities,
        exported.classes,
        point,
        out,
        overwrite,
        (images, model),
        skip_bad,
        heatmaps,
        runtime_sleeps=runtime == "onnx",
    )


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

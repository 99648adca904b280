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
from defectforge.datasets.contract import file_digest
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
RUNTIME_FILES = {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}
EXPORT_FIX = "export the model again (`seg export` or `study export`)"
WHOLE_EXPORT_FIX = (
    "copy the whole export folder again (its files belong together), or " + EXPORT_FIX
)


def is_export(folder: str | Path) -> bool:
    """Whether the folder (local or on a store) holds an export's ``model.json``."""
    return (Location.of(folder) / MODEL_JSON).is_file()


def refuse_unreadable_model(folder: str | Path) -> None:
    """What `predict --model` names, if it is no export, said as what it is before it is read
    as a run folder: nothing there, or an export's model file without its model.json."""
    location = Location.of(folder)
    if not location.exists():
        raise DataError(
            location,
            "nothing is there",
            "pass an export folder (`seg export`, `study export`) or a `seg train` run folder",
        )
    held = [name for name in RUNTIME_FILES.values() if (location / name).is_file()]
    if held:
        raise DataError(
            location / MODEL_JSON,
            f"missing: this folder holds an export's {held[0]} but not the model.json that "
            "describes it",
            WHOLE_EXPORT_FIX,
        )


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
        self.model_file = self.folder / RUNTIME_FILES[runtime]
        self._check_model_file(runtime)
        try:
            loader = self._torchscript if runtime == "torchscript" else self._onnx
            self._run = loader(device)
        except (ImportError, UserError):
            raise
        except Exception:  # noqa: BLE001 - each runtime has its own error types for a bad file
            raise DataError(
                self.model_file, f"the {runtime} model cannot be loaded (damaged?)", EXPORT_FIX
            ) from None
        if "sha256" not in self.meta:  # a file whose hash matched is this export's own
            self._check_outputs()

    def _check_model_file(self, runtime: str) -> None:
        """The model file is there and is the one model.json was written with (exports since
        model.json records its SHA-256): a file copied in from another export would run with
        this one's classes, normalisation and operating point without a word."""
        if not self.model_file.is_file():
            other = next(name for name in RUNTIMES if name != runtime)
            has_other = (self.folder / RUNTIME_FILES[other]).is_file()
            raise DataError(
                self.model_file,
                "missing from this export",
                f"pass --runtime {other} to run its other file, or copy the whole export again"
                if has_other
                else WHOLE_EXPORT_FIX,
            )
        recorded = self.meta.get("sha256", {}).get(self.model_file.name)
        if recorded and file_digest(self.model_file) != recorded:
            raise DataError(
                self.model_file,
                "is not the file this export's model.json was written with (its SHA-256 "
                "differs): a model file of another export, or a damaged copy",
                WHOLE_EXPORT_FIX,
            )

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

    def _check_outputs(self) -> None:
        """One class map per class model.json names: what an export made before model.json
        recorded the SHA-256 of its files can still be checked by, run once on a blank image
        at load rather than found at the first image of a folder."""
        outputs = self.image_logits(np.zeros((8, 8, self.channels), np.uint8)).shape[0]
        if outputs != len(self.classes):
            raise DataError(
                self.model_file,
                f"gives {outputs} output channels, but model.json names {len(self.classes)} "
                f"classes ({', '.join(self.classes)}): a model file of another export",
                WHOLE_EXPORT_FIX,
            )

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

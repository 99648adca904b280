"""`predict` on an export against its bare runtime, printed as a table. Run by hand:

    python benchmarks/predict_throughput.py --model runs/neu-export --images <image folder>

For each runtime (ONNX, TorchScript), in the same run and with the same threads (the runtime's
defaults, and for ONNX Runtime the same session options, as `predict` sets them):
- bare: every image decoded and padded to what the graph takes beforehand; the clock holds only
  the runtime's own call per image (``InferenceSession.run``, or the TorchScript module under
  ``no_grad``) on already converted float32 arrays. This is the limit `predict` can approach.
- predict: `predict_folder_exported` end to end over the same images: decoding, inference,
  softmax, verdicts, mask and overlay PNGs written and the folder published.
The ratio predict / bare is the share of the runtime's speed a user gets. ``--repeats`` times
each and keeps the fastest (the least disturbed by the rest of the machine).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from defectforge.segmentation.exported import (
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    ExportedModel,
    onnx_session,
    predict_folder_exported,
)
from defectforge.segmentation.predictions import image_samples


def graph_inputs(exported: ExportedModel, images: list[np.ndarray]) -> list[np.ndarray]:
    """The NCHW float32 arrays the graph receives for each image, as predict pads them."""
    inputs = []

    def record(batch: np.ndarray) -> np.ndarray:
        inputs.append(np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32))
        return np.zeros((batch.shape[0], len(exported.classes), *batch.shape[1:3]), np.float32)

    for image in images:
        exported.geometry.logits(image[None], record)
    return inputs


def bare_runner(folder: Path, runtime: str):
    if runtime == "onnx":
        session = onnx_session(folder / ONNX_FILE, ["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda pixels: session.run(None, {name: pixels})[0]
    import torch

    module = torch.jit.load(str(folder / TORCHSCRIPT_FILE), map_location="cpu").eval()

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(pixels)).numpy()

    return run


def bare_seconds(run, inputs: list[np.ndarray]) -> float:
    run(inputs[0])  # first call: graph optimisation and allocations, as predict's warm-up is
    started = time.perf_counter()
    for pixels in inputs:
        run(pixels)
    return time.perf_counter() - started


def predict_seconds(model: Path, images: Path, runtime: str) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        predict_folder_exported(model, images, Path(scratch) / "out", runtime)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="an export folder")
    parser.add_argument("--images", required=True, type=Path, help="a folder of images")
    parser.add_argument("--runtimes", nargs="+", default=["onnx", "torchscript"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print("| runtime | images | size | bare s | bare img/s | predict s | predict img/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for runtime in args.runtimes:
        exported = ExportedModel(args.model, runtime)
        samples = image_samples(args.images, exported.channels, input_bits=exported.input_bits)
        images = [read() for _, _, read in samples]
        inputs = graph_inputs(exported, images)
        run = bare_runner(args.model, runtime)
        bare = min(bare_seconds(run, inputs) for _ in range(args.repeats))
        full = min(predict_seconds(args.model, args.images, runtime) for _ in range(args.repeats))
        sizes = {f"{a.shape[2]}x{a.shape[3]}" for a in inputs}
        print(
            f"| {runtime} | {len(images)} | {', '.join(sorted(sizes))} | {bare:.2f} | "
            f"{len(inputs) / bare:.1f} | {full:.2f} | {len(images) / full:.1f} | "
            f"{bare / full:.0%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""What `predict` writes for a folder: per image its mask, an overlay (a heatmap if asked) and
one row of ``predictions.csv`` (verdict and its evidence), published whole. numpy and OpenCV
only, so the PyTorch path and the export runtime write exactly the same files."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from defectforge.core.errors import DataError
from defectforge.core.files import write_json_atomic
from defectforge.core.outputs import PREDICTIONS, publish_dir
from defectforge.core.storage import Location
from defectforge.datasets.contract import encode_png
from defectforge.datasets.images import DEFAULT_MAX_PIXELS, SKIP_BAD_HINT
from defectforge.datasets.readers import images_and_masks, images_in_subfolders, read_image
from defectforge.segmentation.decisions import (
    OPERATING_POINT_FILE,
    OperatingPoint,
    decided_mask,
    defect_probability,
    findings,
)
from defectforge.segmentation.overlay import heatmap, overlay

PREDICTIONS_FILE = "predictions.csv"
REJECTED_FILE = "rejected.csv"
# Images decoded ahead of the model, and images whose class map, row and pictures are being made
# behind it: decoding, arg-max and PNG encoding release the GIL, so they overlap the runtime's
# own threads. The probabilities waiting behind it are bounded in bytes too (large images).
IN_FLIGHT = 4
WAITING_BYTES = 512 * 2**20
# The reading and writing thread's niceness beside a runtime whose threads sleep between
# operations: it then works in those gaps instead of pre-empting one of the runtime's threads,
# which stalls the operation they share (measured: ONNX Runtime without spinning 84% of the bare
# runtime's rate, with this as well 85-89%; a spinning runtime's threads leave no gaps). Beside
# other busy processes it yields to them too.
IO_NICENESS = 10
# (name for the output files, what to call it in errors, how to read it)
Sample = tuple[str, str, Callable[[], np.ndarray]]


def image_samples(
    images: str | Path,
    channels: int,
    mask_suffix: str = "",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    input_bits: int = 8,
) -> list[Sample]:
    """The images of a folder (masks beside them left out), or the one image ``images`` names,
    as samples, each read when needed."""
    paths, masks = images_and_masks(images, mask_suffix)
    samples = [
        (path.stem, str(path), lambda path=path: read_image(path, channels, max_pixels, input_bits))
        for path in paths
    ]
    if masks:
        print(
            f"defectforge: warning: {images}: {len(masks)} files are taken for the masks of "
            f"images beside them and not predicted (e.g. {masks[0].name}); rename an image "
            "that shares its name with another"
            + ("" if mask_suffix else " (a PNG beside a same-name JPEG or BMP is its mask)"),
            file=sys.stderr,
        )
    below = images_in_subfolders(images)
    if below:
        print(
            f"defectforge: warning: {images}: {below} images in its subfolders are not read "
            "(only the folder's own are); point --images at each subfolder",
            file=sys.stderr,
        )
    return samples


def operating_point(stored: dict | None, threshold: float | None, min_area: int | None):
    """The stored operating point (or the default), with what the user gave on top."""
    point = OperatingPoint.from_dict(stored) if stored else OperatingPoint()
    given = {k: v for k, v in (("threshold", threshold), ("min_area", min_area)) if v is not None}
    return replace(point, **given)


def stored_operating_point(folder: str | Path) -> dict | None:
    """A run's calibrated operating point (``seg calibrate``), if it has one."""
    path = Location.of(folder) / OPERATING_POINT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["operating_point"]
    except (ValueError, KeyError):
        raise DataError(path, "not a calibration record", "run `seg calibrate` again") from None


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_predictions(
    samples: list[Sample],
    probabilities_of: Callable[[np.ndarray, str], np.ndarray],
    classes: tuple[str, ...],
    point: OperatingPoint,
    out: str | Path,
    overwrite: bool = False,
    inputs: tuple = (),
    skip_bad: bool = False,
    heatmaps: bool = False,
    runtime_sleeps: bool = False,
) -> list[dict]:
    """Masks, overlays (and with ``heatmaps`` defect-probability pictures) and
    ``predictions.csv`` for every sample, into a new ``out``. A sample that cannot be read or
    predicted stops it all (nothing is published), unless ``skip_bad``: then it is listed in
    ``rejected.csv`` beside the others' results. ``runtime_sleeps``: the runtime's threads sleep
    between operations, so reading and writing wait for those gaps (``IO_NICENESS``)."""
    rows, rejected = [], []
    with publish_dir(out, overwrite, inputs, kind=PREDICTIONS) as staging:
        # One thread: a second would take CPU from the runtime's own threads.
        with ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="predict-io",
            initializer=_yield_to_runtime if runtime_sleeps else None,
        ) as pool:
            finish = Finish(staging, classes, point, heatmaps)
            finishing: deque[tuple[Future, int]] = deque()
            decoded = _read_ahead(pool, samples)
            for (name, source, _), (image, error) in tqdm(
                zip(samples, decoded, strict=True), total=len(samples), desc="predict", unit="img"
            ):
                try:
                    if error:
                        raise error
                    probabilities = probabilities_of(image, source)
                except DataError as err:
                    if not skip_bad:
                        raise DataError(err.path, err.problem, err.fix + SKIP_BAD_HINT) from None
                    rejected.append({"image": name, "file": source, "reason": err.problem})
                    continue
                # The main thread only feeds the runtime; the rest overlaps its next image.
                job = pool.submit(finish, name, image, probabilities)
                finishing.append((job, probabilities.nbytes))
                while len(finishing) > IN_FLIGHT or (
                    len(finishing) > 1 and sum(n for _, n in finishing) > WAITING_BYTES
                ):
                    rows.append(finishing.popleft()[0].result())
            rows += [job.result() for job, _ in finishing]
        if not rows:
            first = rejected[0]
            raise DataError(
                first["file"],
                f"{first['reason']}, and no other image could be predicted either",
                "fix or remove the bad files (run without --skip-bad to see each fix)",
            )
        (staging / PREDICTIONS_FILE).write_text(_csv(rows))
        if rejected:
            (staging / REJECTED_FILE).write_text(_csv(rejected))
        write_json_atomic(staging / OPERATING_POINT_FILE, {"operating_point": asdict(point)})
    return rows


def _yield_to_runtime() -> None:
    """Lower this thread's priority to ``IO_NICENESS`` (Linux, where a thread has its own
    niceness), never raise it (a process run at a lower priority stays there); where the
    system refuses, predict runs on as it is."""
    if not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        niceness = max(os.getpriority(os.PRIO_PROCESS, thread), IO_NICENESS)
        os.setpriority(os.PRIO_PROCESS, thread, niceness)
    except OSError:
        pass


def _read_ahead(
    pool: ThreadPoolExecutor, samples: list[Sample]
) -> Iterator[tuple[np.ndarray | None, DataError | None]]:
    """Each sample's image (or the DataError reading it raised), in order, decoded in the pool
    up to IN_FLIGHT ahead of the caller."""

    def read(sample: Sample) -> tuple[np.ndarray | None, DataError | None]:
        try:
            return sample[2](), None
        except DataError as err:
            return None, err

    pending: deque[Future] = deque()
    for sample in samples:
        pending.append(pool.submit(read, sample))
        if len(pending) > IN_FLIGHT:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@dataclass(frozen=True)
class Finish:
    """What follows an image's probabilities: its row of predictions.csv, its mask and overlay
    (and heatmap) PNGs in ``staging``."""

    staging: Path
    classes: tuple[str, ...]
    point: OperatingPoint
    heatmaps: bool

    def __call__(self, name: str, image: np.ndarray, probabilities: np.ndarray) -> dict:
        mask = decided_mask(probabilities, self.point)
        row = {"image": name, **findings(probabilities, self.classes, self.point, mask)}
        self._write(f"{name}_mask.png", mask)
        self._write(f"{name}_overlay.png", overlay(image, mask))
        if self.heatmaps:
            self._write(f"{name}_heatmap.png", heatmap(defect_probability(probabilities)))
        return row

    def _write(self, file: str, picture: np.ndarray) -> None:
        # Straight into the staging folder, which is published whole or not at all.
        (self.staging / file).write_bytes(encode_png(picture))


def rejected_files(out: str | Path) -> list[dict]:
    """The samples a `predict --skip-bad` into ``out`` listed as bad (none: an empty list)."""
    listing = Location.of(out) / REJECTED_FILE
    if not listing.is_file():
        return []
    return list(csv.DictReader(io.StringIO(listing.read_text(), newline="")))

"""`seg calibrate`: the operating point of a trained run, chosen on its dataset's val split.

Every val image is predicted once at native scale (tiled like `predict`), its largest region
recorded at each candidate threshold, and ``decisions.calibrate`` picks the point. The result
goes beside the model (``operating_point.json``, written atomically), where `predict`, `seg eval`
and `seg export` find it, and into ``plots/operating_point.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from defectforge.datasets.contract import decode_png, split_files
from defectforge.datasets.errors import DataError
from defectforge.datasets.files import write_json_atomic
from defectforge.segmentation.checkpoint import load_model
from defectforge.segmentation.decisions import OPERATING_POINT_FILE, calibrate, largest_by_threshold
from defectforge.segmentation.inference import image_probabilities
from defectforge.segmentation.report import plot_operating_point


def calibrate_run(
    run: str | Path,
    target_recall: float | None = None,
    target_false_alarm: float | None = None,
    store: bool = True,
) -> dict:
    """The operating point for a target; with ``store``, written beside the run's model."""
    model, cfg = load_model(run)
    files = split_files(cfg.data, "val") if (Path(cfg.data) / "val").is_dir() else []
    if not files:
        raise DataError(
            Path(cfg.data) / "val",
            "the run's dataset has no val split here to calibrate on",
            "calibrate where the dataset the run was trained on is",
        )
    table = pq.read_table(files, columns=["image", "mask"])
    largest, defective = [], []
    for image_cell, mask_cell in tqdm(
        zip(table["image"].to_pylist(), table["mask"].to_pylist(), strict=True),
        total=table.num_rows,
        desc="calibrate",
        unit="img",
    ):
        probabilities = image_probabilities(
            model, cfg.batch_spec(), decode_png(image_cell, cfg.channels)
        )
        largest.append(largest_by_threshold(probabilities))
        defective.append(bool(np.any(decode_png(mask_cell, 0) > 0)))
    result = calibrate(largest, defective, target_recall, target_false_alarm)
    if not store:
        return result
    write_json_atomic(Path(run) / OPERATING_POINT_FILE, {**result, "split": "val"})
    plot_operating_point(result, Path(run) / "plots" / "operating_point.png")
    return result

"""`seg calibrate`: the operating point of a trained run, chosen on its dataset's val split.

Every val image is predicted once at native scale (tiled like `predict`), its largest region
recorded at each candidate threshold, and ``decisions.calibrate`` picks the point. The result
goes beside the model (``operating_point.json``, written atomically), where `predict`, `seg eval`
and `seg export` find it, and into ``plots/operating_point.png``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from defectforge.core.storage import Location
from defectforge.segmentation.checkpoint import load_model
from defectforge.segmentation.decisions import (
    OPERATING_POINT_FILE,
    CalibrationTarget,
    calibrate,
    largest_by_threshold,
)
from defectforge.segmentation.inference import dataset_split_pairs, image_probabilities
from defectforge.segmentation.report import plot_operating_point


def calibrate_run(
    run: str | Path,
    target_recall: float | None = None,
    target_false_alarm: float | None = None,
    store: bool = True,
) -> dict:
    """The operating point for a target; with ``store``, written beside the run's model. A
    missing or invalid target is refused before the val split is read."""
    CalibrationTarget(target_recall, target_false_alarm).require()
    model, cfg = load_model(run)
    largest, defective = [], []
    for image, mask in dataset_split_pairs(cfg, "val", "calibrate"):
        largest.append(largest_by_threshold(image_probabilities(model, cfg.batch_spec(), image)))
        defective.append(bool(np.any(mask > 0)))
    result = calibrate(largest, defective, target_recall, target_false_alarm)
    if not store:
        return result
    run = Location.of(run)
    (run / OPERATING_POINT_FILE).write_json({**result, "split": "val"})
    with tempfile.TemporaryDirectory(prefix="defectforge-plot-") as scratch:
        plot = Path(scratch) / "operating_point.png"
        plot_operating_point(result, plot)
        (run / "plots" / plot.name).write_bytes(plot.read_bytes())
    return result

"""`seg calibrate`: the operating point of a trained run, chosen on its dataset's val split.

Every val image is predicted once at native scale (tiled like `predict`), its largest region
recorded at each candidate threshold, and ``decisions.calibrate`` picks the point. The result
goes beside the model (``operating_point.json``, written atomically), where `predict`, `seg eval`
and `seg export` find it, and into ``plots/operating_point.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectforge.core.errors import DataError
from defectforge.core.files import scratch_folder
from defectforge.core.storage import Location
from defectforge.datasets.contract import read_split_table, split_location
from defectforge.segmentation.checkpoint import load_model
from defectforge.segmentation.decisions import (
    OPERATING_POINT_FILE,
    CalibrationTarget,
    calibrate,
    largest_by_threshold,
)
from defectforge.segmentation.inference import (
    dataset_split_pairs,
    image_probabilities,
    run_dataset,
)
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
    run_dataset(cfg)
    _require_both_kinds(cfg.data, target_recall)
    largest, defective = [], []
    for image, mask in dataset_split_pairs(cfg, "val", "calibrate"):
        largest.append(largest_by_threshold(image_probabilities(model, cfg.batch_spec(), image)))
        defective.append(bool(np.any(mask > 0)))
    result = calibrate(largest, defective, target_recall, target_false_alarm)
    if not store:
        return result
    run = Location.of(run)
    (run / OPERATING_POINT_FILE).write_json({**result, "split": "val"})
    with scratch_folder("plot") as scratch:
        plot = Path(scratch) / "operating_point.png"
        plot_operating_point(result, plot)
        (run / "plots" / plot.name).write_bytes(plot.read_bytes())
    return result


def _require_both_kinds(data: str, target_recall: float | None) -> None:
    """A recall needs defective val images and a false-alarm rate defect-free ones; without
    them the rate is 0/0, which would be stored as a perfect 0.000. Read from the rows'
    ``defect_class`` (none on a mask without defect pixels), before anything is predicted."""
    table = read_split_table(data, "val", columns=["defect_class"])
    if table is None:
        return  # dataset_split_pairs says what is missing
    defective = [name is not None for name in table["defect_class"].to_pylist()]
    wanted, rate = (True, "recall") if target_recall is not None else (False, "false-alarm rate")
    if wanted in defective:
        return
    kind = "defective" if wanted else "defect-free"
    other = "--target-false-alarm" if wanted else "--target-recall"
    raise DataError(
        split_location(data, "val"),
        f"none of its {len(defective)} images is {kind}, so a {rate} cannot be measured",
        f"calibrate for {other} instead, or build the dataset with {kind} images in val",
    )

"""A study's deliverable: the chosen model, exported with its metrics and lineage.

The chosen model is the final seed with the best validation score (its test score is known),
else the search's best trial. Its checkpoint is fetched from the study's storage (local or a
pyarrow filesystem) and exported as every run is (``segmentation.export.export_run``).
"""

from __future__ import annotations

from pathlib import Path

from defectforge.core.errors import DataError
from defectforge.core.files import scratch_folder
from defectforge.core.outputs import EXPORT, check_output
from defectforge.core.storage import is_uri
from defectforge.segmentation.calibrate import calibrate_run
from defectforge.segmentation.checkpoint import load_model
from defectforge.segmentation.export import export_run
from defectforge.segmentation.selection import SELECTION_METRIC
from defectforge.studies.compare import COMPARE_FILE
from defectforge.studies.results import FINAL_FILE, STUDY_FILE, TRIALS_FILE, require_trials
from defectforge.studies.spec_schema import SOURCE_DATASETS
from defectforge.studies.store import StudyStore


def chosen_model(store: StudyStore) -> tuple[str, dict]:
    """The checkpoint to ship and the metrics that go with it."""
    trials = store.read_json(TRIALS_FILE)
    if store.exists(FINAL_FILE):
        final = store.read_json(FINAL_FILE)
        seed = max(final["seeds"], key=lambda s: s["best_val_binary_defect_iou"])
        metrics = {
            "val_binary_defect_iou": seed["best_val_binary_defect_iou"],
            "test_binary_defect_iou": seed["test_binary_defect_iou"],
            "test_mean_defect_iou": seed["test_mean_defect_iou"],
            "final_test_binary_defect_iou_interval": final["test_binary_defect_iou"],
            "chosen": f"final run, seed {seed['seed']} (best validation of the final seeds)",
        }
        return seed["best_checkpoint_path"], metrics
    scored = [t for t in trials if t[SELECTION_METRIC] is not None]
    if not scored:
        raise DataError(
            store.uri,
            f"none of its {len(trials)} trials has a validation score, so there is no model to "
            "export",
            "fix what failed (the report has each trial's error), `defectforge study resume` "
            "it, then export",
        )
    best = scored[0]
    chosen = (
        f"compare trial {best['trial']} (best validation of every arm and seed; the arms' "
        "test scores are in compare.json)"
        if store.exists(COMPARE_FILE)
        else f"search trial {best['trial']} (no final step: no test score)"
    )
    metrics = {"val_binary_defect_iou": best[SELECTION_METRIC], "chosen": chosen}
    return best["checkpoint_path"], metrics


def export_study(
    root: str,
    out: str | Path,
    overwrite: bool = False,
    target_recall: float | None = None,
    target_false_alarm: float | None = None,
) -> dict:
    """Export the chosen model; with a target, its operating point is calibrated on the val
    split first and shipped in model.json."""
    store = StudyStore(root)
    require_trials(store, root)
    checkpoint, metrics = chosen_model(store)
    # The input is the checkpoint read, not the whole study: the study keeps its own export
    # inside its folder (``stages.export``), where no reader of the study looks for trials.
    inputs = () if is_uri(checkpoint) else (checkpoint,)
    check_output(out, overwrite, inputs, kind=EXPORT)
    study = store.read_json(STUDY_FILE)
    calibration = None
    with scratch_folder("checkpoint") as scratch:
        local = store.local_copy(checkpoint, scratch)
        model, cfg = load_model(local)
        if target_recall is not None or target_false_alarm is not None:
            calibration = calibrate_run(local, target_recall, target_false_alarm, store=False)
    details = {
        "metrics": metrics,
        "study": {
            "name": study["name"],
            "root": study["root"],
            "spec_sha256": study["spec_sha256"],
        },
        "data": {
            "real_manifest_id": study["dataset_ids"]["real"],
            "synthetic_source": cfg.synthetic_source,
            "synthetic_manifest_id": study["dataset_ids"].get(
                SOURCE_DATASETS[cfg.synthetic_source]
            ),
            "synthetic_ratio": cfg.synthetic_ratio,
        },
        "checkpoint": checkpoint,
    }
    if calibration:
        details["operating_point"] = calibration["operating_point"]
        details["calibration"] = {k: calibration[k] for k in ("recall", "false_alarm_rate", "met")}
    return export_run(model, cfg, out, details, overwrite, inputs)

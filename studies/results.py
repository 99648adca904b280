"""A study's results from its trials' records: the trial table, the final summary, the report.

No Ray here: the runner (``trainables.study_tune``) turns Tune's results into ``TrialRecord``s (a
trial's name, configuration, error and its reported lines), and everything after that, including
redrawing the report of a finished study, reads only the study's own files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from defectforge.core.errors import DataError
from defectforge.core.files import scratch_folder
from defectforge.segmentation.config import SegConfig
from defectforge.segmentation.selection import SELECTION_METRIC, best_epoch
from defectforge.studies.compare import COMPARE_FILE, SEED_KEYS, paired_difference
from defectforge.studies.spec import parse_spec
from defectforge.studies.spec_schema import StudySpec
from defectforge.studies.stats import mean_interval
from defectforge.studies.store import StudyStore

SPEC_FILE, STUDY_FILE = "spec.yaml", "study.json"
TRIALS_FILE, FINAL_FILE = "trials.json", "final.json"
REPORT_DIR = "report"
DEFAULT_EPOCHS = SegConfig.__dataclass_fields__["epochs"].default
KEPT_BEST = "best_checkpoint_path"
# The kept best epoch's own metrics, on every line of a trial that keeps its checkpoints: a trial
# restored from its epoch checkpoint reports only the epochs after it, and its best may be older.
KEPT_BEST_METRICS = "kept_best_metrics"
# SELECTION_METRIC as a number (NaN for an epoch without a score): what Tune ranks a trial's
# reported checkpoints by (a None cannot be ranked).
CHECKPOINT_SCORE = "checkpoint_score"
FINAL_KEYS = (*SEED_KEYS, "test")


@dataclass(frozen=True)
class TrialRecord:
    """One Tune trial as the study keeps it: what it ran, how it ended, what it reported."""

    name: str
    config: dict
    error: str | None
    lines: list[dict]
    # The arm's own values (already merged into config): a final step's baseline arm is the
    # one that has any.
    arm: dict = field(default_factory=dict)


def trial_row(record: TrialRecord, spec: StudySpec) -> dict:
    """One row of trials.json: the trial's values, status and best epoch's validation metrics."""
    # By epoch: an epoch reported again after a resume (Tune restored the one before) counts once.
    epochs = list(
        {
            line["epoch"]: line for line in record.lines if line.get(SELECTION_METRIC) is not None
        }.values()
    )
    # A trial that keeps its own checkpoints says which one is its best, and its metrics, on
    # every line.
    kept = next((line for line in reversed(record.lines) if KEPT_BEST in line), {})
    best = kept.get(KEPT_BEST_METRICS) or best_epoch(record.lines) or {}
    planned = record.config.get("epochs", spec.training.get("epochs", DEFAULT_EPOCHS))
    # Numbered, not counted: a trial resumed from its own epoch checkpoint reports only the
    # epochs after it to Tune.
    epochs_run = max((line.get("epoch", -1) for line in record.lines), default=-1) + 1
    status = "error" if record.error else "finished" if epochs_run >= planned else "stopped early"
    first = record.lines[0] if record.lines else {}
    return {
        "trial": record.name,
        "config": {k: record.config.get(k) for k in _shown_keys(spec)},
        "status": status,
        "epochs_run": epochs_run,
        "best_epoch": best.get("epoch"),
        SELECTION_METRIC: best.get(SELECTION_METRIC),
        "val_mean_defect_iou": best.get("val_mean_defect_iou"),
        "val_per_class_iou": best.get("val_per_class_iou"),
        "val_confusion_matrix": best.get("val_confusion_matrix"),
        "checkpoint_path": kept.get(KEPT_BEST) or best.get("checkpoint_path"),
        "seconds": sum(line.get("epoch_seconds", 0.0) for line in epochs),
        "nodes": sorted({line["node_id"] for line in epochs if line.get("node_id")}),
        "error": error_line(record.error) if record.error else None,
        # When it started (its first report less the time it took): the order trials ran in.
        "started": first.get("timestamp", 0) - first.get("time_total_s", 0),
    }


def error_line(traceback: str) -> str:
    """What a trial's error says: its traceback's last line, without the exception's module
    (``ConfigError: batch_size = 64: ...``); Ray's first line only names the actor."""
    lines = [line for line in traceback.splitlines() if line.strip()]
    last = re.sub(r"\x1b\[[0-9;]*m", "", lines[-1]).strip() if lines else ""
    return re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", last)[:300]


def _shown_keys(spec: StudySpec) -> list[str]:
    """A trial's options worth a column: fixed and varied ones (and a compare study's seeds)."""
    seeds = ["seed"] if spec.search.algorithm == "compare" else []
    return sorted({*spec.fixed(), *spec.varied(), *seeds})


def trial_rows(records: list[TrialRecord], spec: StudySpec) -> list[dict]:
    """Every trial's row, best first."""
    rows = [trial_row(record, spec) for record in records]
    return sorted(rows, key=lambda row: row[SELECTION_METRIC] or -1.0, reverse=True)


def _seed_scores(records: list[TrialRecord]) -> dict:
    """Seed runs' test scores and their means with 95% intervals."""
    seeds = []
    for record in records:
        lines = [line for line in record.lines if "test_binary_defect_iou" in line]
        if record.error or not lines:
            raise RuntimeError(f"final seed run {record.name} failed: {record.error}")
        seeds.append({k: v for k, v in lines[-1].items() if k in FINAL_KEYS})
    seeds.sort(key=lambda row: row["seed"])
    return {
        "seeds": seeds,
        "test_binary_defect_iou": mean_interval([s["test_binary_defect_iou"] for s in seeds]),
        "test_mean_defect_iou": mean_interval([s["test_mean_defect_iou"] or 0.0 for s in seeds]),
        "val_binary_defect_iou": mean_interval([s["best_val_binary_defect_iou"] for s in seeds]),
    }


def summarize_final(
    records: list[TrialRecord], best: dict, chosen_is_baseline: bool = False
) -> dict:
    """The final seeds' test scores and their mean with its 95% interval; with a baseline,
    its seeds too and the chosen minus the baseline, paired by seed."""
    chosen = [r for r in records if not r.arm]
    baseline = [r for r in records if r.arm]
    summary = {"config": best["config"], "from_trial": best["trial"], **_seed_scores(chosen)}
    if chosen_is_baseline:
        summary["chosen_is_baseline"] = True
    if baseline:
        theirs = {"config": baseline[0].arm, **_seed_scores(baseline)}
        summary["baseline"] = theirs
        summary["paired"] = paired_difference(
            {"label": "chosen", "seeds": summary["seeds"]},
            {"label": "baseline", "seeds": theirs["seeds"]},
        )
    return summary


def stored_spec(store: StudyStore) -> StudySpec:
    return parse_spec(yaml.safe_load(store.read_text(SPEC_FILE)), store.location(SPEC_FILE))


def write_study_report(store: StudyStore) -> dict:
    """Render report.md and its PNGs from the study's files; returns the summary it shows."""
    # Here: matplotlib and Optuna's views load only where a report is drawn, not in every trial.
    from defectforge.studies.report import write_report

    study = store.read_json(STUDY_FILE)
    trials = store.read_json(TRIALS_FILE)
    final = store.read_json(FINAL_FILE) if store.exists(FINAL_FILE) else None
    comparison = store.read_json(COMPARE_FILE) if store.exists(COMPARE_FILE) else None
    with scratch_folder("report") as folder:
        summary = write_report(Path(folder), stored_spec(store), study, trials, final, comparison)
        store.upload_folder(folder, REPORT_DIR)
    return {**summary, "location": store.location(f"{REPORT_DIR}/{summary['report']}")}


def require_trials(store: StudyStore, root: str) -> None:
    if not store.exists(STUDY_FILE):
        raise DataError(
            store.location(STUDY_FILE), "not a study folder", "pass a folder made by `study run`"
        )
    if not store.exists(TRIALS_FILE):
        raise DataError(
            store.location(TRIALS_FILE),
            "no trial results yet",
            f"`defectforge study resume {root}` finishes the study",
        )


def report_only(root: str) -> dict:
    store = StudyStore(root)
    require_trials(store, root)
    return write_study_report(store)

"""A study's experiment tracking in MLflow (a spec's ``tracking: {mlflow: URL}``).

Ray Tune's own ``MLflowLoggerCallback`` logs every trial, from the driver: one MLflow run per
trial, its values as parameters and every reported epoch's numbers as metrics. When the study
has its report (and export), one more MLflow run holds the study itself: the chosen values, the
best validation and held-out test figures, the report and the exported model as artifacts.
mlflow is imported only for a spec that asks for it (the ``mlflow`` extra).
"""

from __future__ import annotations

import warnings

from ray.air.integrations.mlflow import MLflowLoggerCallback

from defectforge.core.storage import Location
from defectforge.studies.results import REPORT_DIR
from defectforge.studies.spec_schema import StudySpec, trial_values
from defectforge.studies.store import StudyStore

STUDY_TAG = "defectforge.study"
# study.json's record of the study's own MLflow run.
MLFLOW_RUN_KEY = "mlflow_run"
TUNE_RUN_TAG = "defectforge.tune_run"


def experiment_name(spec: StudySpec) -> str:
    return spec.tracking.experiment or spec.name


class _TrialLogger(MLflowLoggerCallback):
    """Ray Tune's MLflow logger whose failures (the server unreachable, a name MLflow refuses)
    are warnings: tracking never stops a study."""

    def _guarded(self, method, *args, **kwargs) -> None:
        try:
            method(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - mlflow and its HTTP client raise many kinds
            warnings.warn(f"MLflow tracking at {self.tracking_uri} failed: {err}", stacklevel=2)

    def log_trial_start(self, trial) -> None:
        self._guarded(super().log_trial_start, trial)

    def log_trial_result(self, iteration, trial, result) -> None:
        self._guarded(super().log_trial_result, iteration, trial, result)

    def log_trial_end(self, trial, failed=False) -> None:
        self._guarded(super().log_trial_end, trial, failed)


def require_mlflow(spec: StudySpec) -> None:
    """Before any stage runs: a spec that tracks needs mlflow here (a one-line error if not)."""
    if spec.tracking.mlflow:
        import mlflow  # noqa: F401


def tune_callbacks(spec: StudySpec, tune_run: str) -> list:
    """The Tune callbacks that log a Tune run's trials (none without tracking)."""
    if not spec.tracking.mlflow:
        return []
    return [
        _TrialLogger(
            tracking_uri=spec.tracking.mlflow,
            experiment_name=experiment_name(spec),
            tags={STUDY_TAG: spec.name, TUNE_RUN_TAG: tune_run},
        )
    ]


def log_study(spec: StudySpec, store: StudyStore, summary: dict) -> str | None:
    """The study's own MLflow run (its id), or None without tracking or if MLflow failed (a
    warning says why; the study's results are in its folder either way)."""
    if not spec.tracking.mlflow:
        return None
    try:
        return _study_run(spec, store, summary)
    except Exception as err:  # noqa: BLE001 - as _TrialLogger
        warnings.warn(f"MLflow tracking at {spec.tracking.mlflow} failed: {err}", stacklevel=2)
        return None


def _study_run(spec: StudySpec, store: StudyStore, summary: dict) -> str:
    import mlflow

    client = mlflow.MlflowClient(spec.tracking.mlflow)
    name = experiment_name(spec)
    found = client.get_experiment_by_name(name)
    experiment = found.experiment_id if found else client.create_experiment(name)
    run = client.create_run(
        experiment, run_name=f"{spec.name} (study)", tags={STUDY_TAG: spec.name}
    ).info.run_id
    best = summary.get("best") or {}
    for key, value in trial_values(best.get("config") or {}).items():
        client.log_param(run, key, value)
    for key, value in _study_metrics(summary).items():
        client.log_metric(run, key, value)
    for folder, artifact_path in ((REPORT_DIR, "report"), ("export", "export")):
        if store.exists(folder):
            with Location.of(store.location(folder)).as_local_folder() as local:
                client.log_artifacts(run, str(local), artifact_path)
    client.set_terminated(run)
    return run


def _study_metrics(summary: dict) -> dict[str, float]:
    best, final = summary.get("best") or {}, summary.get("final") or {}
    metrics = {"best_val_binary_defect_iou": best.get("val_binary_defect_iou")}
    test = final.get("test_binary_defect_iou") or {}
    for key in ("mean", "low", "high"):
        metrics[f"test_binary_defect_iou_{key}"] = test.get(key)
    paired = (final.get("paired") or {}).get("interval") or {}
    metrics["test_difference_vs_baseline_mean"] = paired.get("mean")
    return {key: float(value) for key, value in metrics.items() if value is not None}

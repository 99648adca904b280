"""Experiment tracking in MLflow: a study's (a spec's ``tracking: {mlflow: URL}``) and a single
run's (``seg train`` / ``gan train --mlflow URL``).

Ray Tune's own ``MLflowLoggerCallback`` logs every trial, from the driver: one MLflow run per
trial, its values as parameters and every reported epoch's numbers as metrics. When the study
has its report (and export), one more MLflow run holds the study itself: the chosen values, the
best validation and held-out test figures, the report and the exported model as artifacts.

A single run is logged from the driver too, from the progress records it already reads for its
bar: the config as parameters, every record's numbers as metrics at its step, and what the run
publishes (model, plots, sample grids) as artifacts; a resumed run continues its MLflow run.
Only the driver reaches the server. mlflow is imported only when asked for (the ``mlflow``
extra), and its failures are warnings: tracking never stops a study or a run.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Iterable
from contextlib import contextmanager

from ray.air.integrations.mlflow import MLflowLoggerCallback

from defectforge.core.storage import Location
from defectforge.studies.results import REPORT_DIR
from defectforge.studies.spec_schema import StudySpec, TrackingSpec, trial_values
from defectforge.studies.store import StudyStore

STUDY_TAG = "defectforge.study"
# study.json's record of the study's own MLflow run.
MLFLOW_RUN_KEY = "mlflow_run"
TUNE_RUN_TAG = "defectforge.tune_run"
# A single run's record of its MLflow run, in its run folder: a resume continues that run.
RUN_RECORD = "mlflow.json"
RUN_TAG = "defectforge.run"
# MLflow's most metrics per log_batch request.
BATCH = 1000


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


class RunTracking:
    """One ``seg train`` or ``gan train`` run as one MLflow run, logged from the driver.

    ``params``: the run's config; ``step``: the progress record's key that counts (``epoch``,
    ``step``). Give it to the run's ``ProgressBar`` as a listener; ``finish`` logs the published
    files. The first failure (server gone, a refused name) is one warning and ends the tracking.
    """

    def __init__(self, tracking: TrackingSpec, out: Location, params: dict, step: str, kind: str):
        import mlflow

        self.client = mlflow.MlflowClient(tracking.mlflow)
        self.uri, self.out, self.step, self.kind = tracking.mlflow, out, step, kind
        self.experiment = tracking.experiment or f"defectforge {kind}"
        self.params = {key: str(value) for key, value in params.items()}
        self.run_id: str | None = None
        self.failed = False

    @contextmanager
    def _guarded(self):
        try:
            yield
        except Exception as err:  # noqa: BLE001 - as _TrialLogger
            self.failed = True
            warnings.warn(
                f"MLflow tracking at {self.uri} failed; the run goes on without it: {err}",
                stacklevel=3,
            )

    def _started(self) -> str:
        """The run's MLflow run: the one its folder records for this server, else a new one."""
        if self.run_id is None:
            record = self.out / RUN_RECORD
            known = record.read_json() if record.is_file() else {}
            if known.get("tracking_uri") == self.uri:
                self.run_id = known["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.run_id = self._new_run()
                record.write_json({"tracking_uri": self.uri, "run_id": self.run_id})
        return self.run_id

    def _new_run(self) -> str:
        from mlflow.entities import Param

        found = self.client.get_experiment_by_name(self.experiment)
        experiment = (
            found.experiment_id if found else self.client.create_experiment(self.experiment)
        )
        run = self.client.create_run(
            experiment, run_name=self.out.name, tags={RUN_TAG: self.kind}
        ).info.run_id
        params = [Param(key, value) for key, value in sorted(self.params.items())]
        for first in range(0, len(params), 100):  # MLflow's most params per request
            self.client.log_batch(run, params=params[first : first + 100])
        return run

    def __call__(self, records: list[dict]) -> None:
        """Log progress records (a ``ProgressBar`` listener)."""
        if self.failed or not records:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, value, now, int(record.get(self.step, 0)))
            for record in records
            for key, value in record.items()
            if key != self.step
        ]
        with self._guarded():
            run = self._started()
            for first in range(0, len(metrics), BATCH):
                self.client.log_batch(run, metrics=metrics[first : first + BATCH])

    def finish(self, published: Iterable[str], failed: bool = False) -> None:
        """Log the run folder's ``published`` files and folders (those present) as artifacts
        and end the MLflow run (FAILED with ``failed``)."""
        if self.failed:
            return
        with self._guarded():
            run = self._started()
            for name in published:
                _log_artifact(self.client, run, self.out / name)
            self.client.set_terminated(run, status="FAILED" if failed else "FINISHED")


def _log_artifact(client, run: str, location: Location) -> None:
    if location.is_dir():
        with location.as_local_folder() as local:
            client.log_artifacts(run, str(local), location.name)
    elif location.is_file() and not location.remote:
        client.log_artifact(run, str(location.local))
    elif location.is_file():
        with tempfile.TemporaryDirectory(prefix="defectforge-") as scratch:
            client.log_artifact(run, str(location.download(scratch)))


def run_tracking(
    tracking: TrackingSpec | None, out: Location, params: dict, step: str, kind: str
) -> RunTracking | None:
    """A run's tracking when ``--mlflow`` was given, else None."""
    if tracking is None or not tracking.mlflow:
        return None
    return RunTracking(tracking, out, params, step, kind)

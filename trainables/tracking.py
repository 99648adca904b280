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

import os
import sys
import time
from collections.abc import Iterable
from contextlib import contextmanager

from tqdm import tqdm

from defectforge.core.files import scratch_folder
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
# MLflow retries a request for minutes by default: a server that is down would hold a run's
# progress bar, or a study's driver, that long before tracking gives up. Values a user sets win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def short_http_retries() -> None:
    """MLflow's HTTP retries and timeout as ``HTTP_DEFAULTS`` says, where the user set none."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def experiment_name(spec: StudySpec) -> str:
    return spec.tracking.experiment or spec.name


def require_mlflow(spec: StudySpec) -> None:
    """Before any stage runs: a spec that tracks needs mlflow here (a one-line error if not),
    and its driver gives up on a server that is down as a single run does."""
    if spec.tracking.mlflow:
        import mlflow  # noqa: F401

        short_http_retries()


def tune_callbacks(spec: StudySpec, tune_run: str) -> list:
    """The Tune callbacks that log a Tune run's trials (none without tracking)."""
    if not spec.tracking.mlflow:
        return []
    from defectforge.trainables.trial_logger import TrialLogger

    return [
        TrialLogger(
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
    except Exception as err:  # noqa: BLE001 - as TrialLogger
        warn_tracking_failed(
            spec.tracking.mlflow, err, "the study's results are in its folder, not in MLflow"
        )
        return None


def warn_tracking_failed(uri: str, err: Exception, goes_on: str) -> None:
    """One line, above any progress bar, rather than Python's warning with its source line:
    tracking never stops a study or a run. ``goes_on``: what happens without it."""
    reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
    tqdm.write(
        f"defectforge: warning: MLflow tracking at {uri} failed; {goes_on}: {reason}",
        file=sys.stderr,
    )


def _study_run(spec: StudySpec, store: StudyStore, summary: dict) -> str:
    import mlflow

    client = mlflow.MlflowClient(spec.tracking.mlflow)
    run = client.create_run(
        _experiment_id(client, experiment_name(spec)),
        run_name=f"{spec.name} (study)",
        tags={STUDY_TAG: spec.name},
    ).info.run_id
    best = summary.get("best") or {}
    for key, value in trial_values(best.get("config") or {}).items():
        client.log_param(run, key, value)
    for key, value in _study_metrics(summary).items():
        client.log_metric(run, key, value)
    for folder in (REPORT_DIR, "export"):
        _log_artifact(client, run, Location.of(store.location(folder)))
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


def _experiment_id(client, name: str) -> str:
    """The MLflow experiment ``name``, created if it is not there yet."""
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


class RunTracking:
    """One ``seg train`` or ``gan train`` run as one MLflow run, logged from the driver.

    ``params``: the run's config; ``step``: the progress record's key that counts (``epoch``,
    ``step``). Give it to the run's ``ProgressBar`` as a listener; ``finish`` logs the published
    files. The first failure (server gone, a refused name) is one warning and ends the tracking.
    A resume continues the MLflow run its folder records (in that run's experiment), or starts
    a new one if that run is gone from the server.
    """

    def __init__(self, tracking: TrackingSpec, out: Location, params: dict, step: str, kind: str):
        import mlflow

        short_http_retries()
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
        except Exception as err:  # noqa: BLE001 - as TrialLogger
            self.failed = True
            warn_tracking_failed(
                self.uri, err, "the run goes on without it (nothing more is tracked)"
            )

    def _started(self) -> str:
        """The run's MLflow run: the one its folder records for this server, else a new one."""
        if self.run_id is None:
            record = self.out / RUN_RECORD
            known = record.read_json() if record.is_file() else {}
            if known.get("tracking_uri") == self.uri and self._reopened(known["run_id"]):
                self.run_id = known["run_id"]
            else:
                self.run_id = self._new_run()
                record.write_json({"tracking_uri": self.uri, "run_id": self.run_id})
        return self.run_id

    def _reopened(self, run_id: str) -> bool:
        """Mark the recorded run running again; False if the server no longer has it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return False
        return True

    def _new_run(self) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(
            _experiment_id(self.client, self.experiment),
            run_name=self.out.name,
            tags={RUN_TAG: self.kind},
        ).info.run_id
        params = [Param(key, value) for key, value in sorted(self.params.items())]
        self.client.log_batch(run, params=params)  # the client splits what a request can hold
        return run

    def __call__(self, records: list[dict]) -> None:
        """Log progress records (a ``ProgressBar`` listener)."""
        if self.failed or not records:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._guarded():
            metrics = [
                Metric(key, value, now, int(record.get(self.step, 0)))
                for record in records
                for key, value in record.items()
                if key != self.step
            ]
            self.client.log_batch(self._started(), metrics=metrics)

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

    def fail(self, published: Iterable[str] = ()) -> None:
        """End the MLflow run FAILED, ``published`` logged, if this run logged anything (one
        refused before its first report, e.g. a --resume with nothing left, has none)."""
        if self.run_id is not None:
            self.finish(published, failed=True)


def _log_artifact(client, run: str, location: Location) -> None:
    if location.is_dir():
        with location.as_local_folder() as local:
            client.log_artifacts(run, str(local), location.name)
    elif location.is_file() and not location.remote:
        client.log_artifact(run, str(location.local))
    elif location.is_file():
        with scratch_folder("mlflow") as scratch:
            client.log_artifact(run, str(location.download(scratch)))


def run_tracking(
    tracking: TrackingSpec | None, out: Location, params: dict, step: str, kind: str
) -> RunTracking | None:
    """A run's tracking when ``--mlflow`` was given, else None."""
    if tracking is None or not tracking.mlflow:
        return None
    return RunTracking(tracking, out, params, step, kind)

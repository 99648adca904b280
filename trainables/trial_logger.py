"""The Tune callback that logs a study's trials to MLflow, in a module of its own: importing
Ray's MLflow integration imports mlflow, which only a driver that tracks should pay for."""

from __future__ import annotations

from ray.air.integrations.mlflow import MLflowLoggerCallback

from defectforge.trainables.tracking import warn_tracking_failed


class TrialLogger(MLflowLoggerCallback):
    """Ray Tune's MLflow logger whose first failure (the server unreachable, a name MLflow
    refuses) is one warning line and ends the tracking of the study's trials: tracking never
    stops a study, and a server that is down would cost every later report its retries."""

    failed = False

    def _guarded(self, method, *args, **kwargs) -> None:
        if self.failed:
            return
        try:
            method(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - mlflow and its HTTP client raise many kinds
            self.failed = True
            warn_tracking_failed(
                self.tracking_uri, err, "the study goes on without it (its trials are not tracked)"
            )

    def setup(self, *args, **kwargs) -> None:
        self._guarded(super().setup, *args, **kwargs)

    def log_trial_start(self, trial) -> None:
        self._guarded(super().log_trial_start, trial)

    def log_trial_result(self, iteration, trial, result) -> None:
        self._guarded(super().log_trial_result, iteration, trial, result)

    def log_trial_end(self, trial, failed=False) -> None:
        self._guarded(super().log_trial_end, trial, failed)

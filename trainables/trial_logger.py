"""The Tune callback that logs a study's trials to MLflow, in a module of its own: importing
Ray's MLflow integration imports mlflow, which only a driver that tracks should pay for."""

from __future__ import annotations

import warnings

from ray.air.integrations.mlflow import MLflowLoggerCallback


class TrialLogger(MLflowLoggerCallback):
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

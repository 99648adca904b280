"""What a study prints while its trials train: one line per reported epoch of every trial and
one when a trial ends, instead of Tune's status table (which ``--verbose`` brings back, with
every reported result)."""

from __future__ import annotations

from ray import tune

from defectforge.segmentation.selection import SELECTION_METRIC
from defectforge.studies.results import KEPT_BEST_METRICS


class TrialLines(tune.Callback):
    """Prints on the driver as Tune hears of each trial's results; ``epochs`` is what a trial
    trains when its configuration does not say."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def _total(self, trial) -> int:
        return int(trial.config.get("epochs") or self.epochs)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "test_binary_defect_iou" in result:
            line = f"held-out test binary defect IoU {_score(result['test_binary_defect_iou'])}"
        elif "epoch" in result:
            line = (
                f"epoch {result['epoch'] + 1}/{self._total(trial)}: loss "
                f"{result.get('train_loss', float('nan')):.4f}, val binary defect IoU "
                f"{_score(result.get(SELECTION_METRIC))}"
            )
        else:
            return
        print(f"{trial}: {line}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        best = last.get(KEPT_BEST_METRICS) or {}
        ran, total = last.get("epoch", -1) + 1, self._total(trial)
        finished = "test_binary_defect_iou" in last or ran >= total
        ending = "done" if finished else f"stopped by the scheduler after epoch {ran}/{total}"
        kept = f"; best val binary defect IoU {_score(best.get(SELECTION_METRIC))}" if best else ""
        print(f"{trial}: {ending}{kept}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        print(f"{trial}: failed (its error is in the report and in {trial.path})", flush=True)


def _score(value) -> str:
    return "none" if value is None else f"{value:.4f}"

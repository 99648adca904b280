"""A study's trials, as Tune runs them in its trial actors: a search trial trains with the test
split sealed; a final or compare trial then scores its best epoch on test."""

from __future__ import annotations

import ray
import ray.data
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from defectforge.core.files import scratch_folder
from defectforge.segmentation.inference import evaluate_dataset_split
from defectforge.segmentation.selection import SELECTION_METRIC
from defectforge.studies.spec_schema import ARMS
from defectforge.studies.store import StudyStore
from defectforge.trainables.data_jobs import sealed_splits
from defectforge.trainables.seg import (
    best_checkpoint,
    make_trainer,
)
from defectforge.trainables.slots import trial_slot
from defectforge.trainables.study_setup import (
    StudyContext,
)
from defectforge.trainables.trial import TrainedTrial, train_in_trial

TRAIN_RUNS = "train"


def _fit(context: StudyContext, values: dict, run_name: str) -> TrainedTrial:
    """Train one trial: in this process with one worker, else as a Ray Train run."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    with trial_slot(context.slots, tune.get_context().get_trial_id()):
        cfg = context.trial_config(values)
        if context.in_process:
            return train_in_trial(cfg, StudyStore(context.root), f"{TRAIN_RUNS}/{run_name}")
        trainer = make_trainer(
            cfg,
            context.root + f"/{TRAIN_RUNS}",
            run_name,
            resources_per_worker=context.worker_resources(),
            callbacks=(TuneReportCallback(),),
        )
        checkpoint, metrics = best_checkpoint(trainer.fit())
        return TrainedTrial(checkpoint.path, metrics)


def search_trial(config: dict, context: StudyContext) -> None:
    with sealed_splits("test"):
        _fit(context, config, tune.get_context().get_trial_id())


def final_trial(config: dict, context: StudyContext) -> None:
    # The run name carries the final run's (and so the chosen trial's) name: a resumed study
    # whose best trial changed never restores another configuration's checkpoints.
    experiment = tune.get_context().get_experiment_name()
    baseline = "-baseline" if _is_baseline(config) else ""
    _held_out_trial(config, context, f"{experiment}-seed{config['seed']}{baseline}")


def _is_baseline(config: dict) -> bool:
    """A final run of the baseline (its arm holds values; the chosen configuration's is empty)."""
    return bool(config.get(ARMS))


def final_label(config: dict) -> str:
    """``seed=1000``, or ``seed=1000_baseline`` for the baseline's run of that seed."""
    return f"seed={config['seed']}" + ("_baseline" if _is_baseline(config) else "")


def compare_trial(config: dict, context: StudyContext) -> None:
    _held_out_trial(config, context, tune.get_context().get_trial_id())


def _held_out_trial(config: dict, context: StudyContext, run_name: str) -> None:
    """Train with the test split sealed, then score the best epoch's model on test."""
    with sealed_splits("test"):
        trained = _fit(context, config, run_name)
    with scratch_folder("checkpoint") as scratch:
        folder = StudyStore(context.root).local_copy(trained.checkpoint_location, scratch)
        test = evaluate_dataset_split(folder, "test", per_image=True)
    tune.report(
        {
            "seed": config["seed"],
            "best_epoch": trained.metrics["epoch"],
            "best_val_binary_defect_iou": trained.metrics[SELECTION_METRIC],
            "test_binary_defect_iou": test["binary_defect_iou"],
            "test_mean_defect_iou": test["mean_defect_iou"],
            "test": test,
            "best_checkpoint_path": trained.checkpoint_location,
        }
    )

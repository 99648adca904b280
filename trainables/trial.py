"""A study trial trained in the trial's own process: one worker, no nested Ray Train run.

A Ray Train run per trial starts a controller, a worker group and a dataset split coordinator
before its first batch; a trial of one worker needs none of them (``benchmarks/
study_overhead.py`` measures the difference). Its Tune actor holds the worker's resources,
streams its Ray Datasets itself, and keeps its epoch checkpoints in the study folder
(``train/<trial>/epoch_NNN/``, the best and the latest kept), from where a restored trial
continues and the final step and the export read them. Each epoch's model (weights and config,
what ``load_model`` reads) is also reported to Tune as the trial's checkpoint, so Tune's own
results carry it: ``ResultGrid.get_best_result().checkpoint`` and ``Result.best_checkpoints``
load as a Ray user expects, and Tune keeps the same two (``study_tune``). Trials of several
workers keep the Train run (``trainables.study``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray import tune

from defectforge.core.files import scratch_folder
from defectforge.segmentation.checkpoint import CONFIG_FILE, MODEL_FILE
from defectforge.segmentation.config import SegConfig
from defectforge.segmentation.loop import train_segmentation
from defectforge.segmentation.selection import SELECTION_METRIC
from defectforge.studies.results import CHECKPOINT_SCORE, KEPT_BEST, KEPT_BEST_METRICS
from defectforge.studies.store import StudyStore
from defectforge.trainables.epochs import EPOCH_METRICS, EpochFolders, epoch_name, epoch_of
from defectforge.trainables.runtime import check_store_here
from defectforge.trainables.seg_feed import one_worker_io, read_splits


@dataclass(frozen=True)
class TrainedTrial:
    """Where a trial's best epoch checkpoint lives (a path or a URI), and that epoch's metrics."""

    checkpoint_location: str
    metrics: dict


def train_in_trial(cfg: SegConfig, store: StudyStore, run: str) -> TrainedTrial:
    """Train ``cfg`` (one worker) here, continuing from the latest epoch saved under ``run``."""
    torch.set_num_threads(cfg.threads or 1)
    check_store_here(store.uri)  # this node may have joined after the study's own check
    folders = EpochFolders(store, run)
    node = ray.get_runtime_context().get_node_id()

    def tell_tune(metrics: dict, folder: Path) -> None:
        name, best = epoch_name(metrics["epoch"]), folders.best()
        score = metrics.get(SELECTION_METRIC)
        with _model_only(folder) as model:
            tune.report(
                {
                    **metrics,
                    "checkpoint_path": folders.location(name),
                    KEPT_BEST: folders.location(best),
                    # Nested: the study reads result.json as written; Tune's CSV and TensorBoard
                    # loggers flatten it into columns of their own.
                    KEPT_BEST_METRICS: folders.saved[best],
                    CHECKPOINT_SCORE: math.nan if score is None else score,
                },
                checkpoint=tune.Checkpoint.from_directory(model),
            )

    def report(metrics: dict, folder: Path) -> None:
        metrics = {**metrics, "node_id": node}  # saved with it: the node that trained it
        folders.save(folder, metrics)
        tell_tune(metrics, folder)
        folders.prune()  # after the report: an epoch Tune never heard of is never the one kept

    with scratch_folder("resume") as scratch:
        local = {}
        # Killed between saving an epoch and Tune hearing of it, a trial would otherwise resume
        # past that epoch with its result lost to Tune, its scheduler and the study's table.
        for name in folders.newer_than(_epoch_tune_restored(folders)):
            local[name] = store.local_copy(folders.location(name), Path(scratch, name))
            tell_tune(folders.saved[name], local[name])
        folders.prune()  # once all are told: a prune between them could drop one not yet told
        latest = folders.latest()
        resume = None
        if latest:
            resume = local.get(latest) or store.local_copy(
                folders.location(latest), Path(scratch, latest)
            )
        train_segmentation(cfg, one_worker_io(cfg, read_splits(cfg), report, resume))
    best = folders.best()
    return TrainedTrial(folders.location(best), folders.saved[best])


def _epoch_tune_restored(folders: EpochFolders) -> int:
    """The epoch of the checkpoint Tune restored this trial from; -1 for a fresh trial."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return -1
    try:  # its metrics file alone: on a store, the model stays where it is
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{EPOCH_METRICS}") as f:
            return json.loads(f.read())["epoch"]
    except FileNotFoundError:
        # A checkpoint from before they carried their metrics: taken as the latest saved.
        latest = folders.latest()
        return epoch_of(latest) if latest else -1


@contextlib.contextmanager
def _model_only(epoch_folder: Path) -> Iterator[str]:
    """A folder holding an epoch folder's model, config and metrics only (links where the disk
    allows, else copies): Tune's copy of the checkpoint needs no optimizer state; the metrics say
    which epoch it is when Tune restores it."""
    with scratch_folder("model") as folder:
        for name in (MODEL_FILE, CONFIG_FILE, EPOCH_METRICS):
            source, target = epoch_folder / name, Path(folder) / name
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        yield folder

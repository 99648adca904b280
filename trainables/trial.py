"""A study trial trained in the trial's own process: one worker, no nested Ray Train run.

A Ray Train run per trial starts a controller, a worker group and a dataset split coordinator
before its first batch; a trial of one worker needs none of them (``benchmarks/
study_overhead.py`` measures the difference). Its Tune actor holds the worker's resources,
streams its Ray Datasets itself, and keeps its epoch checkpoints in the study folder
(``train/<trial>/epoch_NNN/``, the best and the latest kept), from where a restored trial
continues and the final step and the export read them. Trials of several workers keep the Train
run (``trainables.study``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray import tune

from defectforge.segmentation.config import SegConfig
from defectforge.segmentation.loop import train_segmentation
from defectforge.segmentation.metrics import best_epoch
from defectforge.studies.results import KEPT_BEST, KEPT_BEST_METRICS
from defectforge.studies.store import StudyStore
from defectforge.trainables.data_jobs import read_split, train_rows
from defectforge.trainables.seg import fits_in_memory, seg_loop_io

# Written last into an epoch folder: a folder holding it is complete.
EPOCH_METRICS = "epoch_metrics.json"


@dataclass(frozen=True)
class TrainedTrial:
    """Where a trial's best epoch checkpoint lives (a path or a URI), and that epoch's metrics."""

    checkpoint_location: str
    metrics: dict


def _epoch_of(name: str) -> int:
    return int(name.removeprefix("epoch_"))


class EpochFolders:
    """A trial's epoch checkpoints in the study's storage, pruned to the best and the latest."""

    def __init__(self, store: StudyStore, run: str):
        self.store, self.run = store, run
        self.saved = {
            name: store.read_json(f"{run}/{name}/{EPOCH_METRICS}")
            for name in store.subfolders(run)
            if store.exists(f"{run}/{name}/{EPOCH_METRICS}")
        }

    def _names(self) -> list[str]:
        return sorted(self.saved, key=_epoch_of)

    def latest(self) -> str | None:
        return self._names()[-1] if self.saved else None

    def best(self) -> str:
        """The best epoch by the trial table's rule (``best_epoch``); the latest if none scored."""
        best = best_epoch([self.saved[name] for name in self._names()])
        return f"epoch_{best['epoch']:03d}" if best else self.latest()

    def location(self, name: str) -> str:
        return self.store.location(f"{self.run}/{name}")

    def save(self, folder: Path, metrics: dict) -> None:
        name = f"epoch_{metrics['epoch']:03d}"
        (folder / EPOCH_METRICS).write_text(json.dumps(metrics, default=str))
        self.store.upload_folder(folder, f"{self.run}/{name}", last=EPOCH_METRICS)
        self.saved[name] = metrics

    def prune(self) -> None:
        """Delete every epoch folder but the best and the latest."""
        for name in set(self.saved) - {self.best(), self.latest()}:
            self.store.delete_folder(f"{self.run}/{name}")
            del self.saved[name]


def train_in_trial(cfg: SegConfig, store: StudyStore, run: str) -> TrainedTrial:
    """Train ``cfg`` (one worker) here, continuing from the latest epoch saved under ``run``."""
    torch.set_num_threads(cfg.threads or 1)
    folders = EpochFolders(store, run)
    train = train_rows(cfg.data, cfg.synthetic, cfg.mix, cfg.defect_oversample)
    val = read_split(cfg.data, "val")
    node = ray.get_runtime_context().get_node_id()

    def report(metrics: dict, folder: Path | None) -> None:
        folders.save(folder, metrics)
        name, best = f"epoch_{metrics['epoch']:03d}", folders.best()
        tune.report(
            {
                **metrics,
                "node_id": node,
                "checkpoint_path": folders.location(name),
                KEPT_BEST: folders.location(best),
                # Nested: the study reads result.json as written; Tune's CSV and TensorBoard
                # loggers flatten it into columns of their own.
                KEPT_BEST_METRICS: folders.saved[best],
            }
        )
        folders.prune()  # after the report: an epoch Tune never heard of is never the one kept

    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    with tempfile.TemporaryDirectory(prefix="defectforge-resume-") as scratch:
        latest = folders.latest()
        resume = store.local_copy(folders.location(latest), scratch) if latest else None
        io = seg_loop_io(
            cfg,
            train,
            val,
            train.count(),
            report,
            in_memory=fits_in_memory(cfg),
            resume_from=resume,
            device=device,
        )
        train_segmentation(cfg, io)
    best = folders.best()
    return TrainedTrial(folders.location(best), folders.saved[best])

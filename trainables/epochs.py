"""A training run's epoch checkpoints in a folder of a ``StudyStore`` (a local disk or a URI),
pruned to the best and the latest: one-worker runs (a ``seg train`` of one worker, a study trial)
keep their checkpoints here instead of in a Ray Train run's storage. A folder is complete once
its ``epoch_metrics.json`` is there (written last): a run killed while writing one passes over it.
"""

from __future__ import annotations

import json
from pathlib import Path

from defectforge.segmentation.selection import best_epoch
from defectforge.studies.store import StudyStore

# Written last into an epoch folder: a folder holding it is complete.
EPOCH_METRICS = "epoch_metrics.json"
# A one-worker ``seg train``'s run folder under RUN/ray/, beside any Ray Train runs.
ONE_WORKER_RUN = "one-worker"


def epoch_name(epoch: int) -> str:
    """The checkpoint folder of an epoch, ``epoch_NNN`` (one-worker and Ray Train runs alike)."""
    return f"epoch_{epoch:03d}"


def epoch_of(name: str) -> int:
    """The epoch of a checkpoint folder named by ``epoch_name``."""
    return int(name.removeprefix("epoch_"))


class EpochFolders:
    """The epoch folders of one run (``run``: a folder of ``store``)."""

    def __init__(self, store: StudyStore, run: str):
        self.store, self.run = store, run
        self.saved = {
            name: store.read_json(f"{run}/{name}/{EPOCH_METRICS}")
            for name in store.subfolders(run)
            if store.exists(f"{run}/{name}/{EPOCH_METRICS}")
        }

    def _names(self) -> list[str]:
        return sorted(self.saved, key=epoch_of)

    def latest(self) -> str | None:
        return self._names()[-1] if self.saved else None

    def newer_than(self, epoch: int) -> list[str]:
        """The saved epochs after ``epoch``, oldest first."""
        return [name for name in self._names() if epoch_of(name) > epoch]

    def best(self) -> str:
        """The best epoch by the trial table's rule (``best_epoch``); the latest if none scored."""
        best = best_epoch([self.saved[name] for name in self._names()])
        return epoch_name(best["epoch"]) if best else self.latest()

    def location(self, name: str) -> str:
        return self.store.location(f"{self.run}/{name}")

    def save(self, folder: Path, metrics: dict) -> None:
        name = epoch_name(metrics["epoch"])
        (folder / EPOCH_METRICS).write_text(json.dumps(metrics, default=str))
        self.store.upload_folder(folder, f"{self.run}/{name}", last=EPOCH_METRICS)
        self.saved[name] = metrics

    def prune(self) -> None:
        """Delete every epoch folder but the best and the latest."""
        for name in set(self.saved) - {self.best(), self.latest()}:
            self.store.delete_folder(f"{self.run}/{name}")
            del self.saved[name]

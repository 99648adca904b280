"""Segmentation training on Ray over the Parquet splits via Ray Data: one worker in one Ray task,
several as a Ray Train ``TorchTrainer`` (DDP).

The driver (``run_seg_training``) writes a run folder::

    RUN/model.pt, RUN/config.json   best-on-validation weights + the config that rebuilds them
    RUN/metrics.json                per-epoch history and the best epoch's full validation metrics
    RUN/plots/*.png                 training curves, per-class IoU, confusion matrix, val grid
    RUN/ray/one-worker/epoch_NNN/   a one-worker run's checkpoints (the best and the latest)
    RUN/ray/train*/                 a Ray Train run's storage: checkpoints and results

A run of one worker needs none of a Train run's controller, worker group and dataset split
coordinator, which on a small machine take their share of the cores the worker trains on
(``benchmarks/seg_throughput.py``); study trials of one worker train the same way
(``trainables.trial``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict
from pathlib import Path

import ray.data
import ray.train
import torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    Result,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer, get_device, prepare_model

from defectforge.core.errors import DataError
from defectforge.core.outputs import SEG_RUN, check_run_folder, prepare_run_folder
from defectforge.core.storage import Location, absolute_location, local_folder
from defectforge.datasets.leakage import check_no_copies
from defectforge.datasets.manifest import Manifest
from defectforge.segmentation.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    load_training_state,
)
from defectforge.segmentation.config import CHECKPOINT_KEYS as SEG_CHECKPOINT_KEYS
from defectforge.segmentation.config import SegConfig
from defectforge.segmentation.loop import train_segmentation
from defectforge.segmentation.models import absolute_weights, build_model
from defectforge.segmentation.report import write_run_plots
from defectforge.segmentation.selection import SELECTION_METRIC
from defectforge.studies.spec_schema import TrackingSpec
from defectforge.studies.store import StudyStore
from defectforge.trainables.epochs import ONE_WORKER_RUN, EpochFolders, epoch_name, epoch_of
from defectforge.trainables.progress import ProgressBar, RunRecorder
from defectforge.trainables.runtime import (
    check_store_here,
    checkpoint_to_resume,
    fit,
    join_for_training,
    latest_checkpoint_dir,
    refuse_another_run,
    resumed_run_name,
    starting_checkpoint,
    wait_for_task,
    worker_cpus,
)
from defectforge.trainables.seg_feed import Splits, one_worker_io, read_splits, seg_loop_io
from defectforge.trainables.tracking import RunTracking, run_tracking

RUN_NAME = "train"


def config_from_manifest(data: str | Path, **options) -> SegConfig:
    """A SegConfig whose data fields (classes, channels, statistics) come from the dataset."""
    manifest = Manifest.load(data)
    manifest.require_masks(data, "trained on")
    if "encoder_weights" in options:
        options["encoder_weights"] = absolute_weights(options["encoder_weights"])
    return SegConfig(
        data=absolute_location(data),
        classes=manifest.classes,
        channels=manifest.channels,
        input_bits=manifest.input_bits,
        mean=manifest.pixel_mean,
        std=manifest.pixel_std,
        data_manifest_id=manifest.dataset_id,
        **options,
    )


def _seg_worker(config: dict) -> None:
    cfg = SegConfig.from_dict(config["seg"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(
        cfg.threads or max(1, (os.cpu_count() or 1) // context.get_local_world_size())
    )
    recorder = RunRecorder(config["run_dir"]) if config.get("run_dir") and rank == 0 else None

    def report(metrics: dict, folder: Path | None) -> None:
        if rank == 0:
            print(epoch_line(metrics, cfg.epochs), flush=True)
        if recorder is not None:
            recorder.record(metrics, metrics["epoch"])
        checkpoint = Checkpoint.from_directory(str(folder)) if folder else None
        ray.train.report(
            {**metrics, "node_id": ray.get_runtime_context().get_node_id()},
            checkpoint=checkpoint,
            checkpoint_dir_name=epoch_name(metrics["epoch"]),
        )

    checkpoint = starting_checkpoint(config)
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume:
        train_segmentation(
            cfg,
            seg_loop_io(
                cfg,
                ray.train.get_dataset_shard("train"),
                ray.train.get_dataset_shard("val"),
                config["train_rows"],
                report,
                in_memory=config["in_memory"],
                world=world,
                rank=rank,
                resume_from=Path(resume) if resume else None,
                device=get_device(),
                prepare=prepare_model if world > 1 else (lambda m: m),
            ),
        )


def _epochs_done(metrics: dict) -> float:
    return metrics["epoch"] + 1


def _epoch_summary(metrics: dict) -> str:
    return (
        f"loss {metrics['train_loss']:.3f}, val IoU {metrics['val_binary_defect_iou']:.3f}, "
        f"{metrics['train_img_per_s']:.1f} img/s"
    )


def epoch_line(metrics: dict, epochs: int) -> str:
    return (
        f"epoch {metrics['epoch'] + 1}/{epochs}: loss {metrics['train_loss']:.4f}, "
        f"{metrics['train_img_per_s']:.1f} img/s, val binary defect IoU "
        f"{metrics['val_binary_defect_iou']:.4f}, mean defect IoU "
        f"{metrics['val_mean_defect_iou'] or 0:.4f}"
    )


def make_trainer(
    cfg: SegConfig,
    storage: str,
    name: str,
    resume_from: Location | None = None,
    max_failures: int = 1,
    resources_per_worker: dict | None = None,
    callbacks: tuple = (),
    run_dir: Location | None = None,
) -> TorchTrainer:
    """A TorchTrainer over the config's splits; Ray keeps the run under ``storage``/``name``
    (a local path or a pyarrow URI) and restores it by name after an interruption.
    ``resources_per_worker`` None: Ray's default (1 CPU, plus 1 GPU with ``cfg.use_gpu``).
    ``run_dir``: where rank 0 records progress and TensorBoard events (studies: Tune does)."""
    splits = read_splits(cfg)
    return TorchTrainer(
        _seg_worker,
        train_loop_config={
            "seg": asdict(cfg),
            "train_rows": splits.train_count,
            "in_memory": splits.in_memory,
            "resume_from": str(resume_from) if resume_from else None,
            "run_dir": str(run_dir) if run_dir else None,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources_per_worker
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=SELECTION_METRIC
            ),
            callbacks=list(callbacks),
        ),
        datasets={"train": splits.train, "val": splits.val},
    )


def best_checkpoint(result) -> tuple[Checkpoint, dict]:
    """The kept checkpoint with the best validation score, and its metrics."""
    return max(result.best_checkpoints, key=lambda pair: pair[1][SELECTION_METRIC] or 0.0)


@ray.remote(max_retries=1)
def _one_worker_run(
    config: dict, splits: Splits, storage: str, run_dir: str
) -> tuple[str, dict, str]:
    """A one-worker ``seg train`` in this task: its epoch folders go to ``storage``/one-worker,
    its progress to ``run_dir``. It starts from the run's newest whole checkpoint of either kind
    (its own after an interruption, a --resume or Ray's retry after a lost worker; an earlier
    Ray Train run's), else from scratch. Returns the best epoch's folder, its metrics and the
    latest epoch's folder."""
    cfg = SegConfig.from_dict(config)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    check_store_here(run_dir)
    folders = EpochFolders(StudyStore(storage), ONE_WORKER_RUN)
    recorder = RunRecorder(run_dir)
    node = ray.get_runtime_context().get_node_id()

    def report(metrics: dict, folder: Path | None) -> None:
        metrics = {**metrics, "node_id": node}
        # Saved before it is shown: an epoch redone after a kill is recorded once.
        folders.save(folder, metrics)
        folders.prune()
        print(epoch_line(metrics, cfg.epochs), flush=True)
        recorder.record(metrics, metrics["epoch"])

    start = latest_checkpoint_dir(storage)
    with _local_checkpoint(start) as resume_from:
        train_segmentation(cfg, one_worker_io(cfg, splits, report, resume_from))
    best = folders.best()
    return folders.location(best), folders.saved[best], folders.location(folders.latest())


@contextlib.contextmanager
def _local_checkpoint(folder: Location | None):
    """A checkpoint folder as a local folder (a store's copied for the block), or None."""
    if folder is None:
        yield None
        return
    with folder.as_local_folder() as local:
        yield local


def _train_one_worker(
    cfg: SegConfig, out: Location, resume: bool, tracker: RunTracking | None
) -> tuple[Checkpoint, dict, Checkpoint]:
    storage = out / "ray"
    start = checkpoint_to_resume(storage) if resume else latest_checkpoint_dir(storage)
    finished = start is not None and epoch_of(start.name) + 1 >= cfg.epochs
    # A finished one-worker run asked again publishes its epochs again; anything else finished
    # (a --resume, another kind of run's checkpoint) would train nothing.
    if finished and (resume or start.parent.name != ONE_WORKER_RUN):
        raise DataError(
            out,
            f"its latest checkpoint ({start.parent.name}/{start.name}) already has all "
            f"{cfg.epochs} epochs",
            "pass a larger --epochs",
        )
    splits = read_splits(cfg)
    task = _one_worker_run.options(
        num_cpus=1 if cfg.use_gpu else worker_cpus(1), num_gpus=1 if cfg.use_gpu else 0
    )
    prepare_run_folder(out, SEG_RUN, inputs=(cfg.data, cfg.synthetic))
    progress = _progress(out, cfg, tracker)  # before the task starts: only this run's lines
    best, best_metrics, latest = wait_for_task(
        task.remote(asdict(cfg), splits, storage.uri, out.uri), progress
    )
    return Checkpoint(best), best_metrics, Checkpoint(latest)


def _train_with_ray_train(
    cfg: SegConfig, out: Location, resume: bool, tracker: RunTracking | None
) -> tuple[Checkpoint, dict, Checkpoint]:
    storage = out / "ray"
    name, previous = resumed_run_name(storage, RUN_NAME) if resume else (RUN_NAME, None)
    resources = None if cfg.use_gpu else {"CPU": worker_cpus(cfg.workers)}
    trainer = make_trainer(
        cfg, storage.uri, name, resume_from=previous, resources_per_worker=resources, run_dir=out
    )
    prepare_run_folder(out, SEG_RUN, inputs=(cfg.data, cfg.synthetic))
    result = fit(trainer, _progress(out, cfg, tracker))
    best, best_metrics = best_checkpoint(result)
    return best, best_metrics, result.checkpoint


def _progress(out: Location, cfg: SegConfig, tracker: RunTracking | None) -> ProgressBar:
    listeners = (tracker,) if tracker else ()
    return ProgressBar(out, cfg.epochs, "epoch", _epochs_done, _epoch_summary, listeners=listeners)


def run_seg_training(
    cfg: SegConfig, out: str | Path, resume: bool = False, tracking: TrackingSpec | None = None
) -> dict:
    """Train on Ray, then publish the best checkpoint's model, metrics and plots into ``out``.

    An interrupted run continues from its latest checkpoint when the same command runs again;
    ``resume`` continues a finished one, e.g. to more epochs. Every input is checked before
    ``out`` is made, so a refused run leaves no folder. ``tracking``: an MLflow run of the
    config, every epoch's metrics and what is published.
    """
    out = Location.of(check_run_folder(out, SEG_RUN, (cfg.data, cfg.synthetic)))
    if cfg.encoder_weights is not None:
        # Refused weights (a file of another encoder, imagenet without network) must fail
        # here, not in a worker after the run folder is made.
        build_model(cfg.arch, cfg.encoder, cfg.channels, cfg.num_classes, cfg.encoder_weights)
    if cfg.synthetic and cfg.mix is not None and cfg.mix.ratio:
        check_no_copies(cfg.data, cfg.synthetic)  # here once, not in every epoch's data stream
    join_for_training(out, cfg.use_gpu, cfg.workers)
    # Per-operator bars of every epoch's data stream drown the epoch lines; the run's own bar
    # and our one line per epoch show progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    tracker = run_tracking(tracking, out, asdict(cfg), "epoch", "seg train")
    try:
        published = _train_and_publish(cfg, out, resume, tracker)
    except Exception:
        if tracker:
            tracker.fail()
        raise
    if tracker:
        tracker.finish(("plots", MODEL_FILE, CONFIG_FILE, "metrics.json"))
    return published


def _train_and_publish(
    cfg: SegConfig, out: Location, resume: bool, tracker: RunTracking | None
) -> dict:
    refuse_another_run(out, asdict(cfg), SEG_CHECKPOINT_KEYS)
    train = _train_one_worker if cfg.workers == 1 else _train_with_ray_train
    best, best_metrics, latest = train(cfg, out, resume, tracker)
    with latest.as_directory() as folder:
        history = load_training_state(folder)["history"]
    with best.as_directory() as folder:
        for name in (MODEL_FILE, CONFIG_FILE):
            (out / name).write_bytes((Path(folder) / name).read_bytes())
    summary = {"best": best_metrics, "history": history, "config": asdict(cfg)}
    (out / "metrics.json").write_json(summary)
    local = local_folder(out)
    plots = write_run_plots(local)
    if out.remote:
        (out / "plots").upload(local / "plots")
    RunRecorder(out).image(local / "plots" / "validation_grid.png", best_metrics["epoch"])
    return {**summary, "plots": [out / "plots" / path.name for path in plots]}


def run_result(out: str | Path) -> Result:
    """A ``seg train`` run as Ray Train's own ``Result``, read from its folder (nothing resumes):
    ``checkpoint`` is the latest epoch, ``best_checkpoints`` the epochs kept with their
    metrics, ``metrics`` the latest epoch's; every checkpoint is an epoch folder ``load_model``
    reads. A run of several workers is a Ray Train run (``Result.from_path``); a one-worker run
    keeps its epochs in ``RUN/ray/one-worker``, outside any Train run, and gets the same shape
    (with ``metrics_dataframe``, one row per epoch). After a resume of the other kind, the
    newest run is the one read."""
    storage = Location.of(out) / "ray"
    latest = latest_checkpoint_dir(storage) if storage.is_dir() else None
    if latest is None:
        raise DataError(out, "no epoch checkpoint here", "pass the folder of a `seg train` run")
    run = latest.parent
    if run.name != ONE_WORKER_RUN:
        return Result.from_path(run.path, storage_filesystem=run.filesystem)
    import pandas as pd

    folders = EpochFolders(StudyStore(storage.uri), ONE_WORKER_RUN)
    kept = [
        (Checkpoint(folders.location(name)), folders.saved[name])
        for name in sorted(folders.saved, key=epoch_of)
    ]
    with latest.as_local_folder() as folder:
        history = load_training_state(folder)["history"]
    return Result(
        metrics=folders.saved[latest.name],
        checkpoint=Checkpoint(folders.location(latest.name)),
        error=None,
        path=run.path,
        metrics_dataframe=pd.DataFrame(history),
        best_checkpoints=kept,
        _storage_filesystem=run.filesystem,
    )

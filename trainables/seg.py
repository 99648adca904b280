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
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import ray.data
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, get_device, prepare_model

from defectforge.core.errors import ConfigError, DataError
from defectforge.core.outputs import SEG_RUN, check_run_folder, prepare_run_folder
from defectforge.core.storage import Location, absolute_location, local_folder
from defectforge.datasets.batches import BatchMaker
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.replay import (
    CachedRows,
    encoded_bytes,
    prefetched,
    within_cache_limit,
)
from defectforge.segmentation.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    load_training_state,
)
from defectforge.segmentation.config import SegConfig
from defectforge.segmentation.loop import LoopIO, train_segmentation
from defectforge.segmentation.report import write_run_plots
from defectforge.segmentation.selection import SELECTION_METRIC
from defectforge.studies.store import StudyStore
from defectforge.trainables.data_jobs import largest_side, read_split, train_rows
from defectforge.trainables.epochs import ONE_WORKER_RUN, EpochFolders, epoch_name, epoch_of
from defectforge.trainables.progress import ProgressBar, RunRecorder
from defectforge.trainables.runtime import (
    check_storage_everywhere,
    check_store_here,
    checkpoint_to_resume,
    ensure_ray,
    fit,
    latest_checkpoint_dir,
    resumed_run_name,
    starting_checkpoint,
    wait_for_task,
    worker_cpus,
)

SHUFFLE_BUFFER = 256
RUN_NAME = "train"


def config_from_manifest(data: str | Path, **options) -> SegConfig:
    """A SegConfig whose data fields (classes, channels, statistics) come from the dataset."""
    manifest = Manifest.load(data)
    manifest.require_masks(data, "trained on")
    return SegConfig(
        data=absolute_location(data),
        classes=manifest.classes,
        channels=manifest.channels,
        mean=manifest.pixel_mean,
        std=manifest.pixel_std,
        data_manifest_id=manifest.dataset_id,
        **options,
    )


def _torch_collate(maker: BatchMaker):
    def collate(batch):
        return {key: torch.from_numpy(value) for key, value in maker(batch).items()}

    return collate


def seg_loop_io(
    cfg: SegConfig,
    train_data,
    val_data,
    train_count: int,
    report,
    *,
    in_memory: bool = False,
    world: int = 1,
    rank: int = 0,
    resume_from: Path | None = None,
    device: torch.device | None = None,
    prepare=lambda model: model,
) -> LoopIO:
    """The loop's batches and callbacks over ``train_data``/``val_data`` (a Ray Dataset, or a
    Ray Train worker's shard of one: both iterate the same way). With ``in_memory``
    (``fits_in_memory``) both are read once, before the first step, and every epoch replays
    them from memory; otherwise every epoch is a new Ray Data pass."""
    train_maker = BatchMaker(cfg.batch_spec(), train=True, seed=cfg.seed * 1000 + rank)
    val_maker = BatchMaker(cfg.batch_spec(), train=False)
    steps = train_count // (world * cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    feed = partial(_replayed_from_memory, rank=rank) if in_memory else _ray_data_passes
    return LoopIO(
        train_batches=feed(train_data, cfg, train_maker, train=True),
        val_batches=partial(feed(val_data, cfg, val_maker, train=False), 0),
        steps_per_epoch=max(steps, 1),
        report=report,
        resume_from=resume_from,
        device=device or torch.device("cpu"),
        prepare_model=prepare,
        rank=rank,
        on_epoch_start=train_maker.set_epoch,
    )


def _ray_data_passes(data, cfg: SegConfig, maker: BatchMaker, train: bool):
    """Epoch -> a Ray Data pass over ``data``; for training, locally shuffled, whole batches."""

    def epoch_batches(epoch: int):
        options = {"batch_size": cfg.batch_size, "collate_fn": _torch_collate(maker)}
        if train:
            options.update(
                drop_last=True,
                local_shuffle_buffer_size=SHUFFLE_BUFFER,
                local_shuffle_seed=cfg.seed + epoch,
            )
        return data.iter_torch_batches(prefetch_batches=2, **options)

    return epoch_batches


def _replayed_from_memory(data, cfg: SegConfig, maker: BatchMaker, train: bool, rank: int):
    """Epoch -> a pass over ``data``'s rows, read once on the first call and kept in memory;
    for training, reshuffled per epoch and rank, whole batches. Batches are prepared two ahead
    in a thread."""
    cached: CachedRows | None = None

    def epoch_batches(epoch: int):
        nonlocal cached
        if cached is None:
            cached = CachedRows(data.iter_batches(batch_size=256, batch_format="numpy"))
        seed = (cfg.seed, rank, epoch) if train else None
        rows = cached.batches(cfg.batch_size, seed, drop_last=train)
        return prefetched(_torch_collate(maker)(batch) for batch in rows)

    return epoch_batches


@dataclass(frozen=True)
class Splits:
    """What a run trains and validates on: its train rows (real plus the chosen synthetic ones,
    defect rows oversampled) and the val split as Ray Datasets, the train row count, and
    whether a worker keeps both in memory (``fits_in_memory``)."""

    train: ray.data.Dataset
    val: ray.data.Dataset
    train_count: int
    in_memory: bool


def read_splits(cfg: SegConfig) -> Splits:
    """The config's splits; a damaged or missing dataset, and crops or batches the data cannot
    fill, fail here in one line, before a run folder is made."""
    train = train_rows(cfg.data, cfg.synthetic, cfg.mix, cfg.defect_oversample)
    val = read_split(cfg.data, "val")
    check_crop_fits(cfg)
    count = train.count()
    check_batch_fits(cfg, count)
    return Splits(train, val, count, fits_in_memory(cfg))


def crop_limit(cfg: SegConfig) -> tuple[int, int]:
    """(the longest train image side, or the resize; the largest crop that fits it)."""
    side = cfg.image_size or max(
        largest_side(root, "train") for root in (cfg.data, cfg.synthetic) if root
    )
    return side, -(-side // 32) * 32  # crops come in multiples of 32


def check_crop_fits(cfg: SegConfig) -> None:
    """Refuse a crop larger than every train image: each would be mostly padding, and a huge
    one exhausts memory only once training has started."""
    if not cfg.crop_size:
        return
    side, limit = crop_limit(cfg)
    if cfg.crop_size > limit:
        seen = "the images are resized to" if cfg.image_size else "the longest train image side is"
        raise ConfigError(
            f"crop_size = {cfg.crop_size}: larger than every train image ({seen} {side} px), so "
            f"each crop would be mostly padding; set crop_size (--crop-size) to {limit} or less, "
            "or to 0 for whole images"
        )


def check_batch_fits(cfg: SegConfig, train_count: int) -> None:
    """Refuse a batch no worker can fill: whole batches only are trained on, so such a run
    would take no step and publish its untrained weights."""
    per_worker = train_count // cfg.workers
    if per_worker >= cfg.batch_size:
        return
    workers = f", {per_worker} for each of {cfg.workers} workers" if cfg.workers > 1 else ""
    fix = (
        f"set batch_size (--batch-size) to {per_worker} or less"
        if per_worker
        else f"train with at most {train_count} workers, or add train images"
    )
    raise ConfigError(
        f"batch_size = {cfg.batch_size}: the train split gives {train_count} images per "
        f"epoch{workers}, fewer than one batch, so not one training step would run; {fix}"
    )


def one_worker_io(
    cfg: SegConfig, splits: Splits, report, resume_from: Path | None = None
) -> LoopIO:
    """The loop's IO for one worker training in this process: a one-worker ``seg train``'s
    task, a study trial."""
    return seg_loop_io(
        cfg,
        splits.train,
        splits.val,
        splits.train_count,
        report,
        in_memory=splits.in_memory,
        resume_from=resume_from,
        device=torch.device("cuda" if cfg.use_gpu else "cpu"),
    )


def fits_in_memory(cfg: SegConfig) -> bool:
    """Whether a worker keeps its train and val rows in memory (``seg_loop_io``'s in_memory):
    their encoded images and masks, counted from Parquet metadata (every synthetic row and every
    oversampled copy as if all were chosen), are within ``replay.CACHED_SPLIT_BYTES``. A run
    decides once, on its driver (``read_splits``), so that every rank of a Train run does the
    same."""
    cells = ("image", "mask")
    train = encoded_bytes(cfg.data, "train", cells)
    if cfg.synthetic and cfg.synthetic_ratio:
        train += encoded_bytes(cfg.synthetic, "train", cells)
    total = train * cfg.defect_oversample + encoded_bytes(cfg.data, "val", cells)
    return within_cache_limit(total)


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
    cfg: SegConfig, out: Location, resume: bool
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
    progress = _progress(out, cfg)  # before the task starts: it shows only this run's lines
    best, best_metrics, latest = wait_for_task(
        task.remote(asdict(cfg), splits, storage.uri, out.uri), progress
    )
    return Checkpoint(best), best_metrics, Checkpoint(latest)


def _train_with_ray_train(
    cfg: SegConfig, out: Location, resume: bool
) -> tuple[Checkpoint, dict, Checkpoint]:
    storage = out / "ray"
    name, previous = resumed_run_name(storage, RUN_NAME) if resume else (RUN_NAME, None)
    resources = None if cfg.use_gpu else {"CPU": worker_cpus(cfg.workers)}
    trainer = make_trainer(
        cfg, storage.uri, name, resume_from=previous, resources_per_worker=resources, run_dir=out
    )
    prepare_run_folder(out, SEG_RUN, inputs=(cfg.data, cfg.synthetic))
    result = fit(trainer, _progress(out, cfg))
    best, best_metrics = best_checkpoint(result)
    return best, best_metrics, result.checkpoint


def _progress(out: Location, cfg: SegConfig) -> ProgressBar:
    return ProgressBar(out, cfg.epochs, "epoch", _epochs_done, _epoch_summary)


def run_seg_training(cfg: SegConfig, out: str | Path, resume: bool = False) -> dict:
    """Train on Ray, then publish the best checkpoint's model, metrics and plots into ``out``.

    An interrupted run continues from its latest checkpoint when the same command runs again;
    ``resume`` continues a finished one, e.g. to more epochs. Every input is checked before
    ``out`` is made, so a refused run leaves no folder.
    """
    out = Location.of(check_run_folder(out, SEG_RUN, (cfg.data, cfg.synthetic)))
    ensure_ray()
    check_storage_everywhere(out.uri, "--out")  # workers write their checkpoints where they run
    # Per-operator bars of every epoch's data stream drown the epoch lines; the run's own bar
    # and our one line per epoch show progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    train = _train_one_worker if cfg.workers == 1 else _train_with_ray_train
    best, best_metrics, latest = train(cfg, out, resume)
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

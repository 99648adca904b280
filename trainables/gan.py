"""StyleGAN2 training on Ray Train: K workers (gloo on CPU, NCCL on GPU), real images via Ray Data.

The run folder::

    RUN/generator.pt, RUN/config.json   G_ema of the latest snapshot + the config that rebuilds it
    RUN/metrics.json                    every snapshot's kimg, losses, img/s and SWD
    RUN/samples/kimg_NNNNN.png          the fixed-seed grid at each snapshot
    RUN/snapshots/kimg_NNNNN/           each snapshot's G_ema + config (what `gan metrics` and
                                        `gan generate` read), kept for every snapshot as
                                        StyleGAN2-ADA keeps its network pickles
    RUN/ray/                            Ray Train storage: snapshot checkpoints (resume state)
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import ray.data
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, get_device

from defectforge.core.errors import ConfigError, DataError
from defectforge.core.outputs import GAN_RUN, check_run_folder, prepare_run_folder
from defectforge.core.storage import Location, absolute_location
from defectforge.datasets.batches import GanBatchMaker
from defectforge.datasets.contract import read_split_table
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.replay import CachedRows, encoded_bytes, within_cache_limit
from defectforge.gan.checkpoint import (
    CONFIG_FILE,
    GENERATOR_FILE,
    METRICS_FILE,
    SAMPLES_DIR,
    SAMPLES_FILE,
    SNAPSHOTS_DIR,
    kimg_of,
    load_gan_state,
    snapshot_name,
)
from defectforge.gan.config import MIN_RESOLUTION, RESUMABLE_CHANGES, GanConfig
from defectforge.gan.loop import GanLoopIO, train_gan
from defectforge.gan.report import write_plots
from defectforge.studies.spec_schema import TrackingSpec
from defectforge.trainables.data_jobs import read_split
from defectforge.trainables.gan_reals import (
    batch_maker,
    check_defects_to_learn,
    check_enough_rows,
    columns,
    measures_for,
    metric_reals,
    wanted,
)
from defectforge.trainables.progress import ProgressBar, RunRecorder
from defectforge.trainables.runtime import (
    check_store_here,
    fit,
    join_for_training,
    refuse_another_run,
    resumed_run_name,
    starting_checkpoint,
    worker_cpus,
)
from defectforge.trainables.tracking import run_tracking

SHUFFLE_BUFFER = 256
RUN_NAME = "train"


def gan_config_from_manifest(data: str | Path, profile: str = "cpu-small", **options) -> GanConfig:
    """The profile's config for this dataset, with ``options`` (the ones the user gave) on top."""
    manifest = Manifest.load(data)
    base = GanConfig(
        data=absolute_location(data),
        data_manifest_id=manifest.dataset_id,
        channels=manifest.channels,
        classes=manifest.classes[1:],
    )
    cfg = replace(base.with_profile(profile), **options)
    if cfg.native_crops:
        _check_crops_fit(cfg)
    if cfg.defect_crops:
        manifest.require_masks(data, "cropped over their defects (--defect-crops)")
    if cfg.masks:
        manifest.require_masks(data, "learnt with their masks (--masks)")
    return cfg


def _check_crops_fit(cfg: GanConfig) -> None:
    """Native-scale crops of side ``resolution`` need train images at least that large (a
    smaller one would be padded with its own mirror image, which the GAN would learn)."""
    sizes = read_split_table(cfg.data, "train", columns=["height", "width"])
    smallest = min(pc.min(sizes["height"]).as_py(), pc.min(sizes["width"]).as_py())
    if smallest < cfg.resolution:
        # Resolutions are powers of two: the largest that fits is the one to suggest.
        fits = 1 << (smallest.bit_length() - 1)
        lower = (
            f"lower --resolution to {fits} (a power of two no larger than that side), or drop "
            "--native-crops"
            if fits >= MIN_RESOLUTION
            else "drop --native-crops (whole images are resized to --resolution)"
        )
        raise ConfigError(
            f"--native-crops at --resolution {cfg.resolution}: the smallest train image of "
            f"{cfg.data} has a side of {smallest} px; {lower}"
        )


def real_images(cfg: GanConfig, split: str = "train") -> ray.data.Dataset:
    dataset = read_split(cfg.data, split).select_columns(columns(cfg))
    predicate = wanted(cfg)
    return dataset if predicate is None else dataset.filter(expr=predicate)


def replays_in_memory(cfg: GanConfig) -> bool:
    """Whether workers keep their shard after the first pass: the train split's encoded images
    (and masks, where the GAN reads them; Parquet metadata, no read) fit in
    ``replay.CACHED_SPLIT_BYTES``. Decided once, on the driver, so every rank does the same: a
    rank still streaming would wait at the split's epoch barrier for ranks that never come back."""
    return within_cache_limit(encoded_bytes(cfg.data, "train", columns(cfg)))


def _endless(shard, cfg: GanConfig, maker: GanBatchMaker, replay: bool):
    """Real batches forever. The first pass streams the shard; with ``replay`` (a small train
    split, ``replays_in_memory``) its rows are kept and replayed from memory, reshuffled each
    epoch, far faster than a Ray Data pass per epoch on a few-shot set
    (``benchmarks/gan_data_feed.py``; its figures in docs/benchmarks.md). Otherwise every epoch
    is a new pass."""
    kept, rows = [], 0
    for batch in _shard_pass(shard, cfg, epoch=0, drop_last=False):
        rows += len(batch["image"])
        if replay:
            kept.append(batch)
        if len(batch["image"]) == cfg.batch_size:
            yield _tensors(maker(batch))
    if rows < cfg.batch_size:
        raise DataError(
            cfg.data,
            f"a GAN worker got {rows} train image(s), fewer than one batch of {cfg.batch_size}",
            "lower --batch-size or --workers, or add images",
        )
    if not replay:
        yield from _streamed(shard, cfg, maker)
    cached = CachedRows(kept, columns=tuple(columns(cfg)))
    del kept
    for epoch in itertools.count(1):
        for batch in cached.batches(cfg.batch_size, shuffle_seed=cfg.seed + epoch):
            yield _tensors(maker(batch))


def _streamed(shard, cfg: GanConfig, maker: GanBatchMaker):
    for epoch in itertools.count(1):
        for batch in _shard_pass(shard, cfg, epoch):
            yield _tensors(maker(batch))


def _shard_pass(shard, cfg: GanConfig, epoch: int, drop_last: bool = True):
    return shard.iter_batches(
        batch_size=cfg.batch_size,
        drop_last=drop_last,
        batch_format="numpy",
        local_shuffle_buffer_size=SHUFFLE_BUFFER,
        local_shuffle_seed=cfg.seed + epoch,
    )


def _tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(value) for key, value in batch.items()}


def _gan_worker(config: dict) -> None:
    cfg = GanConfig.from_dict(config["gan"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(
        cfg.threads or max(1, (os.cpu_count() or 1) // context.get_local_world_size())
    )
    maker = batch_maker(cfg, rank)
    run = Location.of(config["run_dir"])
    check_store_here(run.uri)
    # Read by the driver and shipped in the object store: no worker reads the dataset's files.
    reals = ray.get(config["metric_reals"])

    recorder = RunRecorder(config["run_dir"]) if rank == 0 else None
    nodes = _worker_nodes(context.get_world_size())

    def report(metrics: dict, folder: Path | None) -> None:
        name = snapshot_name(metrics["kimg"])
        metrics = {**metrics, "nodes": nodes}
        if recorder is not None:
            grid = folder / SAMPLES_FILE if folder is not None else None
            recorder.record(metrics, round(metrics["kimg"] * 1000), grid)
        if folder is not None:
            (run / SAMPLES_DIR / f"{name}.png").write_bytes((folder / SAMPLES_FILE).read_bytes())
            _keep_generator(folder, run / SNAPSHOTS_DIR / name)
            print(
                f"kimg {metrics['kimg']:.2f}/{cfg.kimg}: SWD {metrics.get('swd', 0):.1f}, "
                f"{metrics['img_per_s']:.1f} img/s",
                flush=True,
            )
        checkpoint = Checkpoint.from_directory(str(folder)) if folder else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    checkpoint = starting_checkpoint(config)
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume:
        train_gan(
            cfg,
            GanLoopIO(
                real_batches=_endless(
                    ray.train.get_dataset_shard("train"), cfg, maker, config["replay_reals"]
                ),
                report=report,
                real_for_metric=lambda: reals,
                sample_metrics=ray.get(config["sample_measures"]),
                progress=None if recorder is None else partial(_record_progress, recorder),
                resume_from=Path(resume) if resume else None,
                device=get_device(),
                rank=rank,
            ),
        )


def _record_progress(recorder: RunRecorder, metrics: dict) -> None:
    recorder.record(metrics, round(metrics["kimg"] * 1000))


def _keep_generator(checkpoint: Path, folder: Location) -> None:
    """The snapshot's generator and config, the generator last (a folder holding it is
    whole), so every snapshot stays scorable after Ray has pruned its resume state."""
    if (folder / GENERATOR_FILE).is_file():
        return
    for file_name in (CONFIG_FILE, GENERATOR_FILE):
        (folder / file_name).write_bytes((checkpoint / file_name).read_bytes())


def _worker_nodes(world: int) -> list[str]:
    """The Ray node ids the run's workers train on (reported with every snapshot)."""
    node = ray.get_runtime_context().get_node_id()
    gathered = [node]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, node)
    return sorted(set(gathered))


def _kimg_done(metrics: dict) -> float:
    return metrics["kimg"]


def _snapshot_summary(metrics: dict) -> str:
    """The bar's text: a snapshot's SWD (and defect share), else the latest losses."""
    rate = f"{metrics.get('img_per_s', 0):.1f} img/s"
    if "swd" in metrics:
        share = metrics.get("defect_share")
        held = f", defects in {share:.0%}" if share is not None else ""
        return f"SWD {metrics['swd']:.1f}{held}, {rate}"
    losses = (
        f"G {metrics['g_loss']:.2f}, D {metrics['d_loss']:.2f}, " if "g_loss" in metrics else ""
    )
    return f"{losses}{rate}"


def run_gan_training(
    cfg: GanConfig,
    out: str | Path,
    resume: bool = False,
    max_failures: int = 2,
    tracking: TrackingSpec | None = None,
) -> dict:
    """Train (or, with ``resume``, continue a finished run to ``cfg.kimg``) and publish the
    lowest-SWD snapshot's generator and grid, the metric history and every grid in ``out``.
    Every input is checked before ``out`` is made, so a refused run leaves no folder.
    ``tracking``: an MLflow run of the config, the losses and snapshot measures by step, and
    what is published."""
    out = Location.of(check_run_folder(out, GAN_RUN, (cfg.data,)))
    join_for_training(out, cfg.use_gpu, cfg.workers)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # The command again into a folder with snapshots continues that run, --resume or not.
    bound = tuple(name for name in asdict(cfg) if name not in RESUMABLE_CHANGES)
    refuse_another_run(out, asdict(cfg), bound)
    name, previous = resumed_run_name(out / "ray", RUN_NAME) if resume else (RUN_NAME, None)
    if previous is not None and kimg_of(previous.name) >= cfg.kimg:
        raise DataError(
            out,
            f"its latest snapshot ({previous.name}) already has --kimg {cfg.kimg:g}",
            "pass a larger --kimg to train on",
        )
    cpus = None if cfg.use_gpu else {"CPU": worker_cpus(cfg.workers)}
    check_enough_rows(cfg)
    check_defects_to_learn(cfg)
    reals = real_images(cfg)
    prepare_run_folder(out, GAN_RUN, inputs=(cfg.data,))
    measures = measures_for(cfg, out)
    trainer = TorchTrainer(
        _gan_worker,
        train_loop_config={
            "gan": asdict(cfg),
            "run_dir": out.uri,
            "metric_reals": ray.put(metric_reals(cfg)),
            "sample_measures": ray.put(measures),
            "replay_reals": replays_in_memory(cfg),
            "resume_from": str(previous) if previous else None,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=cpus,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=(out / "ray").uri,
            failure_config=FailureConfig(max_failures=max_failures),
            # The three lowest-SWD snapshots (and the latest, for resuming) are kept.
            checkpoint_config=CheckpointConfig(
                num_to_keep=3, checkpoint_score_attribute="swd", checkpoint_score_order="min"
            ),
        ),
        datasets={"train": reals},
    )
    tracker = run_tracking(tracking, out, asdict(cfg), "step", "gan train")
    bar = ProgressBar(
        out,
        cfg.kimg,
        "kimg",
        _kimg_done,
        _snapshot_summary,
        name="gan",
        listeners=(tracker,) if tracker else (),
    )
    try:
        result = fit(trainer, bar)
        with result.checkpoint.as_directory() as folder:
            history = load_gan_state(Path(folder))["history"]
        summary = publish_run(cfg, out, history, nodes=result.metrics.get("nodes", []))
    except Exception as err:
        if tracker:
            # A run that never beat its start still publishes its curves: they say why.
            published = ("plots", METRICS_FILE) if isinstance(err, DataError) else ()
            tracker.fail(published)
        raise
    if tracker:
        tracker.finish(("plots", METRICS_FILE, SAMPLES_FILE, GENERATOR_FILE, CONFIG_FILE))
    return summary


def publish_run(
    cfg: GanConfig, out: Location, history: list[dict], nodes: tuple[str, ...] = ()
) -> dict:
    """The run's metrics and plots, then its lowest-SWD snapshot after kimg 0 as the run's
    generator: refused in one line (and nothing published for the next step) if no snapshot
    came closer to the real images than the untrained start."""
    summary = {"final": history[-1], "history": history, "config": asdict(cfg)}
    summary["nodes"] = list(nodes)  # where the workers ran
    start, trained = history[0], [row for row in history if row["kimg"] > 0]
    best = min(trained, key=lambda row: row["swd"]) if trained else None
    improved = best is not None and best["swd"] < start["swd"]
    summary["best"] = best if improved else None
    (out / METRICS_FILE).write_json(summary)
    write_plots(out, history)
    if not improved:
        for name in (GENERATOR_FILE, CONFIG_FILE, SAMPLES_FILE):
            (out / name).delete()
        raise DataError(out, *_no_improvement(cfg, start, history))
    name = snapshot_name(best["kimg"])
    for source, file_name in (
        (out / SNAPSHOTS_DIR / name / CONFIG_FILE, CONFIG_FILE),
        (out / SAMPLES_DIR / f"{name}.png", SAMPLES_FILE),
        (out / SNAPSHOTS_DIR / name / GENERATOR_FILE, GENERATOR_FILE),  # last: the run's record
    ):
        (out / file_name).write_bytes(source.read_bytes())
    return summary


def _no_improvement(cfg: GanConfig, start: dict, history: list[dict]) -> tuple[str, str]:
    curve = " -> ".join(f"{row['swd']:.0f}" for row in history)
    return (
        f"no snapshot beat the untrained generator's SWD {start['swd']:.1f} (SWD by snapshot: "
        f"{curve}), so no generator was published",
        f"train longer (--resume with a larger --kimg than {cfg.kimg:g}), or a new run (another "
        "--out) with more images"
        + ("" if cfg.diffaug else " or --diffaug color,translation,cutout"),
    )

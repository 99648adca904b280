"""StyleGAN2 training on Ray Train: K workers (gloo on CPU, NCCL on GPU), real images via Ray Data.

The run folder::

    RUN/generator.pt, RUN/config.json   G_ema of the latest snapshot + the config that rebuilds it
    RUN/metrics.json                    every snapshot's kimg, losses, img/s and SWD
    RUN/samples/kimg_NNNNN.png          the fixed-seed grid at each snapshot
    RUN/ray/                            Ray Train storage: snapshot checkpoints (resume state)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
import ray.train
import torch
from ray.data.expressions import Expr, col
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, get_device

from defectforge.datasets.batches import GanBatchMaker
from defectforge.datasets.contract import SCHEMA, encode_png, run_identity, split_files
from defectforge.datasets.errors import ConfigError, DataError
from defectforge.datasets.files import atomic_write, write_json_atomic
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.outputs import GAN_RUN, check_output, check_run_folder, prepare_run_folder
from defectforge.datasets.replay import CachedRows, encoded_bytes, within_cache_limit
from defectforge.datasets.writer import write_dataset
from defectforge.gan.checkpoint import (
    CONFIG_FILE,
    GENERATOR_FILE,
    SAMPLES_FILE,
    load_gan_state,
    load_generator,
)
from defectforge.gan.config import GanConfig
from defectforge.gan.generate import generate_images
from defectforge.gan.loop import GanLoopIO, train_gan
from defectforge.trainables.data_jobs import read_split
from defectforge.trainables.progress import ProgressBar, RunRecorder
from defectforge.trainables.runtime import (
    ensure_ray,
    fit,
    resumed_run_name,
    starting_checkpoint,
    worker_cpus,
)

SHUFFLE_BUFFER = 256
RUN_NAME = "train"


def gan_config_from_manifest(data: str | Path, profile: str = "cpu-small", **options) -> GanConfig:
    """The profile's config for this dataset, with ``options`` (the ones the user gave) on top."""
    manifest = Manifest.load(data)
    base = GanConfig(
        data=str(Path(data).resolve()),
        data_manifest_id=manifest.dataset_id,
        channels=manifest.channels,
        classes=manifest.classes[1:],
    )
    cfg = replace(base.with_profile(profile), **options)
    if cfg.native_crops:
        _check_crops_fit(cfg)
    if cfg.defect_crops:
        manifest.require_masks(data, "cropped over their defects (--defect-crops)")
    return cfg


def _check_crops_fit(cfg: GanConfig) -> None:
    """Native-scale crops of side ``resolution`` need train images at least that large (a
    smaller one would be padded with its own mirror image, which the GAN would learn)."""
    sizes = pq.read_table(split_files(cfg.data, "train"), columns=["height", "width"])
    smallest = min(pc.min(sizes["height"]).as_py(), pc.min(sizes["width"]).as_py())
    if smallest < cfg.resolution:
        raise ConfigError(
            f"--native-crops at --resolution {cfg.resolution}: the smallest train image of "
            f"{cfg.data} has a side of {smallest} px; lower --resolution to {smallest} or less, "
            "or drop --native-crops"
        )


def _wanted(cfg: GanConfig) -> Expr | None:
    """The rows the GAN learns from, as a predicate both Ray Data and pyarrow evaluate natively
    (None: every row)."""
    if cfg.defect_class:
        return col("defect_class") == cfg.defect_class
    return col("defect_class").is_not_null() if cfg.conditional else None


def _columns(cfg: GanConfig) -> list[str]:
    """What the GAN reads of a row: masks (and the image's file, for errors) only where they
    place its crops."""
    return ["id", "image", "defect_class", *(["mask", "origin"] if cfg.defect_crops else [])]


def real_images(cfg: GanConfig, split: str = "train") -> ray.data.Dataset:
    dataset = read_split(cfg.data, split).select_columns(_columns(cfg))
    wanted = _wanted(cfg)
    return dataset if wanted is None else dataset.filter(expr=wanted)


def _batch_maker(cfg: GanConfig, rank: int) -> GanBatchMaker:
    classes = cfg.classes if cfg.conditional else ()
    crop_seed = _crop_seed(cfg, rank)
    return GanBatchMaker(cfg.channels, cfg.resolution, classes, crop_seed, cfg.defect_crops)


def metric_reals(cfg: GanConfig, split: str = "train") -> np.ndarray:
    """The first ``metric_images`` real images (seeded shuffle) at the GAN resolution, uint8,
    cropped as the GAN sees them."""
    table = pq.read_table(split_files(cfg.data, split), columns=_columns(cfg))
    wanted = _wanted(cfg)
    rows = (table if wanted is None else table.filter(wanted.to_pyarrow())).to_pylist()
    if not rows:
        raise DataError(
            cfg.data,
            f"no {split} images match the requested class",
            "check --class against the dataset's classes",
        )
    order = np.random.default_rng(cfg.seed).permutation(len(rows))[: cfg.metric_images]
    picked = [rows[i] for i in order]
    masks = [row["mask"] for row in picked] if cfg.defect_crops else None
    origins = [row["origin"] for row in picked] if cfg.defect_crops else None
    return _batch_maker(cfg, rank=-1).images([row["image"] for row in picked], masks, origins)


def _crop_seed(cfg: GanConfig, rank: int) -> int | None:
    """Each worker's crops differ; the metric reals (rank -1) are the same crops every time."""
    return cfg.seed * 1000 + rank + 1 if cfg.native_crops else None


def replays_in_memory(cfg: GanConfig) -> bool:
    """Whether workers keep their shard after the first pass: the train split's encoded images
    (and masks, where the GAN reads them; Parquet metadata, no read) fit in
    ``replay.CACHED_SPLIT_BYTES``. Decided once, on the driver, so every rank does the same: a
    rank still streaming would wait at the split's epoch barrier for ranks that never come back."""
    return within_cache_limit(encoded_bytes(cfg.data, "train", _columns(cfg)))


def _endless(shard, cfg: GanConfig, maker: GanBatchMaker, replay: bool):
    """Real batches forever. The first pass streams the shard; with ``replay`` (a small train
    split, ``replays_in_memory``) its rows are kept and replayed from memory, reshuffled each
    epoch: a Ray Data pass per epoch fed 131 img/s on 163 images, replay 2,005
    (gan_data_feed.py). Otherwise every epoch is a new pass."""
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
    cached = CachedRows(kept, columns=tuple(_columns(cfg)))
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
    maker = _batch_maker(cfg, rank)
    samples = Path(config["samples_dir"])
    # Read by the driver and shipped in the object store: no worker reads the dataset's files.
    reals = ray.get(config["metric_reals"])

    recorder = RunRecorder(config["run_dir"]) if rank == 0 else None
    nodes = _worker_nodes(context.get_world_size())

    def report(metrics: dict, folder: Path | None) -> None:
        name = f"kimg_{metrics['kimg']:09.3f}"
        metrics = {**metrics, "nodes": nodes}
        if recorder is not None:
            grid = folder / SAMPLES_FILE if folder is not None else None
            recorder.record(metrics, round(metrics["kimg"] * 1000), grid)
        if folder is not None:
            samples.mkdir(parents=True, exist_ok=True)
            atomic_write(samples / f"{name}.png", partial(shutil.copyfile, folder / SAMPLES_FILE))
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
                resume_from=Path(resume) if resume else None,
                device=get_device(),
                rank=rank,
            ),
        )


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
    swd = f"SWD {metrics['swd']:.1f}, " if "swd" in metrics else ""
    return f"{swd}{metrics.get('img_per_s', 0):.1f} img/s"


def run_gan_training(
    cfg: GanConfig, out: str | Path, resume: bool = False, max_failures: int = 2
) -> dict:
    """Train (or, with ``resume``, continue a finished run to ``cfg.kimg``) and publish the
    lowest-SWD snapshot's generator and grid, the metric history and every grid in ``out``.
    Every input is checked before ``out`` is made, so a refused run leaves no folder."""
    out = check_run_folder(out, (cfg.data,))
    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    name, previous = resumed_run_name(out / "ray", RUN_NAME) if resume else (RUN_NAME, None)
    cpus = None if cfg.use_gpu else {"CPU": worker_cpus(cfg.workers)}
    reals = real_images(cfg)
    prepare_run_folder(out, GAN_RUN, inputs=(cfg.data,))
    trainer = TorchTrainer(
        _gan_worker,
        train_loop_config={
            "gan": asdict(cfg),
            "samples_dir": str(out / "samples"),
            "run_dir": str(out),
            "metric_reals": ray.put(metric_reals(cfg)),
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
            storage_path=str(out / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
            # The three lowest-SWD snapshots (and the latest, for resuming) are kept.
            checkpoint_config=CheckpointConfig(
                num_to_keep=3, checkpoint_score_attribute="swd", checkpoint_score_order="min"
            ),
        ),
        datasets={"train": reals},
    )
    bar = ProgressBar(out, cfg.kimg, "kimg", _kimg_done, _snapshot_summary, name="gan")
    result = fit(trainer, bar)
    best_checkpoint, best_metrics = min(
        result.best_checkpoints, key=lambda pair: pair[1].get("swd", float("inf"))
    )
    with best_checkpoint.as_directory() as folder:
        for file_name in (GENERATOR_FILE, CONFIG_FILE, SAMPLES_FILE):
            atomic_write(out / file_name, partial(shutil.copyfile, Path(folder) / file_name))
    with result.checkpoint.as_directory() as folder:
        history = load_gan_state(Path(folder))["history"]
    summary = {
        "best": best_metrics,
        "final": history[-1],
        "history": history,
        "config": asdict(cfg),
        "nodes": best_metrics.get("nodes", []),
    }
    write_json_atomic(out / "metrics.json", summary)
    return summary


def _class_index(cfg: GanConfig, class_name: str | None) -> int | None:
    if class_name is None:
        return None
    if class_name not in cfg.classes:
        raise ConfigError(f"--class {class_name!r} is not among {list(cfg.classes)}")
    return cfg.classes.index(class_name)


def _generated_row(identity: str, seed: int, image: np.ndarray, cfg: GanConfig, class_name) -> dict:
    return {
        "id": f"gan/{identity}/seed{seed:05d}",
        "image": encode_png(image),
        "mask": None,
        "height": image.shape[0],
        "width": image.shape[1],
        "channels": image.shape[2],
        "dataset": Path(cfg.data).name,
        "source": "synthetic",
        "split": "train",
        "defect_class": class_name or cfg.defect_class,
        "label_confidence": None,
        "origin": f"{identity}/seed{seed}",
    }


def write_generated(
    model: str | Path,
    out: str | Path,
    seeds: list[int],
    truncation_psi: float = 1.0,
    class_name: str | None = None,
    overwrite: bool = False,
) -> Manifest:
    """PNG per seed plus a dataset of synthetic rows (no masks yet) with its manifest."""
    check_output(out, overwrite, (model,))
    generator, cfg = load_generator(model)
    class_index = _class_index(cfg, class_name)
    identity = run_identity(model, GENERATOR_FILE)
    with write_dataset(out, overwrite, inputs=(model,)) as staging:
        images = generate_images(generator, cfg, seeds, truncation_psi, class_index)
        rows = [
            _generated_row(identity, seed, image, cfg, class_name)
            for seed, image in zip(seeds, images, strict=True)
        ]
        for row, seed in zip(rows, seeds, strict=True):
            staging.path(f"seed{seed:05d}.png").write_bytes(row["image"])
        staging.write_split("train", pa.Table.from_pylist(rows, schema=SCHEMA))
        generation = {
            "seeds": seeds,
            "truncation_psi": truncation_psi,
            "class": class_name,
            "gan_config": asdict(cfg),
        }
        classes = ("background", *cfg.classes) if cfg.classes else ("background", "defect")
        staging.publish(Manifest.generated(identity, classes, cfg.channels, generation))
    return staging.manifest


def generator_metrics(
    model: str | Path,
    data: str | Path | None = None,
    count: int = 0,
    inception: str | None = None,
    class_name: str | None = None,
) -> dict:
    """SWD (and FID/KID given local Inception weights) between ``count`` generated images and
    as many real images of the run's (or another) dataset. A conditional generator is scored on
    ``class_name`` against real images of that class, or on every class in turn."""
    from defectforge.gan.generate import cycled_classes
    from defectforge.gan.loop import METRIC_SEED
    from defectforge.gan.metrics import inception_metrics, sliced_wasserstein

    generator, cfg = load_generator(model)
    cfg = replace(cfg, data=str(data or cfg.data), metric_images=count or cfg.metric_images)
    class_index = _class_index(cfg, class_name)
    if class_name is not None:
        cfg = replace(cfg, defect_class=class_name)
    reals = metric_reals(cfg)
    classes = (
        class_index if class_index is not None else cycled_classes(len(reals), cfg.num_classes)
    )
    fakes = generate_images(
        generator, cfg, range(METRIC_SEED, METRIC_SEED + len(reals)), class_index=classes
    )
    result = {"images": len(reals), **sliced_wasserstein(reals, fakes)}
    if inception:
        result.update(inception_metrics(reals, fakes, inception))
    return result

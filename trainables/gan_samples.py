"""What a trained generator gives: generated datasets (``gan generate``) and its scores
(``gan metrics``). No Ray: a generator runs on the driver's CPU (or GPU) in seconds."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from defectforge.core.errors import ConfigError, DataError
from defectforge.core.outputs import DATASET, check_output
from defectforge.core.storage import Location
from defectforge.datasets.build import pixel_statistics
from defectforge.datasets.contract import SCHEMA, contract_row, run_identity
from defectforge.datasets.leakage import maker_source
from defectforge.datasets.lineage import LabellingSection
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.readers import dominant_class, pixel_sums
from defectforge.datasets.writer import check_derived_output, write_dataset
from defectforge.gan.checkpoint import GENERATOR_FILE, SNAPSHOTS_DIR, kimg_of, load_generator
from defectforge.gan.config import GanConfig
from defectforge.gan.generate import cycled_classes, generate_samples
from defectforge.gan.loop import METRIC_SEED
from defectforge.gan.metrics import inception_metrics, sliced_wasserstein
from defectforge.gan.report import write_plots
from defectforge.trainables.gan_reals import PRESENCE_FILE, measures_for, metric_reals

# Generated in tables of this many images, each written before the next is drawn: memory stays
# the same for 100 or 1,000,000 seeds.
SEEDS_PER_TABLE = 512


def _class_index(cfg: GanConfig, class_name: str | None) -> int | None:
    if class_name is None:
        return None
    if class_name not in cfg.classes:
        raise ConfigError(f"--class {class_name!r} is not among {list(cfg.classes)}")
    return cfg.classes.index(class_name)


def _generated_row(
    identity: str, seed: int, image: np.ndarray, mask: np.ndarray | None, cfg: GanConfig, class_name
) -> dict:
    return contract_row(
        id=f"gan/{identity}/seed{seed:05d}",
        image=image,
        mask=mask,
        dataset=Path(cfg.data).name,
        origin=f"{identity}/seed{seed}",
        defect_class=(class_name or cfg.defect_class) if mask is None else _drawn_class(mask, cfg),
    )


def _drawn_class(mask: np.ndarray, cfg: GanConfig) -> str | None:
    """The contract's defect_class of a drawn mask: its class with most pixels."""
    return dominant_class(mask, ("background", *cfg.classes))


def write_generated(
    model: str | Path,
    out: str | Path,
    seeds: list[int],
    truncation_psi: float = 1.0,
    class_name: str | None = None,
    overwrite: bool = False,
) -> Manifest:
    """PNG per seed plus a dataset of synthetic rows with its manifest: without masks (to be
    labelled by `synth label`), or, from a generator that draws masks, with them (ready to mix;
    samples whose mask holds no defect are left out, as labelling leaves them out)."""
    if not seeds:
        raise ConfigError("no seeds to generate: give --count 1 or more, or --seeds")
    check_output(out, overwrite, (model,), kind=DATASET)
    generator, cfg = load_generator(model)
    # The data it learnt from is an input too: generated rows must never land there.
    check_derived_output(out, overwrite, (cfg.data,))
    class_index = _class_index(cfg, class_name)
    if class_name is not None and not cfg.conditional:
        trained_on = f"class {cfg.defect_class!r} only" if cfg.defect_class else "every class"
        raise ConfigError(
            f"--class {class_name!r}: this generator was trained without --conditional (on "
            f"{trained_on}), so it cannot be asked for a class; leave out --class, or train "
            "one with --conditional"
        )
    identity = run_identity(model, GENERATOR_FILE)
    asked = {"truncation_psi": truncation_psi, "class": class_name}
    with write_dataset(out, overwrite, inputs=(model,)) as staging:
        kept_statistics = []
        for start in range(0, len(seeds), SEEDS_PER_TABLE):
            part = seeds[start : start + SEEDS_PER_TABLE]
            images, masks = generate_samples(generator, cfg, part, truncation_psi, class_index)
            drawn = [None] * len(part) if masks is None else list(masks)
            rows = [
                _generated_row(identity, seed, image, mask, cfg, class_name)
                for seed, image, mask in zip(part, images, drawn, strict=True)
            ]
            if masks is not None:
                kept = [i for i, row in enumerate(rows) if row["defect_class"] is not None]
                kept_statistics += [pixel_sums(images[i]) for i in kept]
                rows = [rows[i] for i in kept]
            if rows:
                _write_pngs(staging, rows)
                staging.write_split("train", pa.Table.from_pylist(rows, schema=SCHEMA))
        classes = ("background", *cfg.classes) if cfg.classes else ("background", "defect")
        manifest = Manifest.generated(
            identity, classes, cfg.channels, {"seeds": seeds, **asked}, asdict(cfg)
        )
        if cfg.mask_channels:
            manifest = _with_drawn_masks(
                manifest, cfg, identity, asked, len(seeds), kept_statistics
            )
        staging.publish(manifest)
    return staging.manifest


def _write_pngs(staging, rows: list[dict]) -> None:
    """Each generated image (and drawn mask) as a PNG beside the rows, named by its seed."""
    for row in rows:
        stem = row["id"].rsplit("/", 1)[-1]
        staging.path(f"{stem}.png").write_bytes(row["image"])
        if row["mask"] is not None:
            staging.path(f"{stem}_mask.png").write_bytes(row["mask"])


def _with_drawn_masks(
    generated: Manifest,
    cfg: GanConfig,
    identity: str,
    asked: dict,
    generated_count: int,
    kept_statistics: list[dict],
) -> Manifest:
    """The manifest of images whose masks the generator drew (``asked``: with what truncation
    and class): labelled by their maker, which learnt from ``cfg.data`` alone (the leakage check
    reads this)."""
    if not kept_statistics:
        raise DataError(
            cfg.data,
            f"the generator drew no defect pixel in any of its {generated_count} samples",
            "train it longer (see its samples/ grids and SWD), or generate more seeds",
        )
    mean, std = pixel_statistics(kept_statistics, cfg.channels)
    labelling = LabellingSection(
        labeller="drawn by the generator (exact masks)",
        generator=identity,
        config=asked,
        trained_on=(maker_source("GAN", cfg.data, cfg.data_manifest_id),),
        images=generated_count,
        kept=len(kept_statistics),
        dropped={"no defect pixel": generated_count - len(kept_statistics)},
    )
    return generated.labelled(
        generated.classes,
        len(cfg.classes) == 1,
        labelling,
        pixel_mean=tuple(mean),
        pixel_std=tuple(std),
    )


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
    generator, cfg = load_generator(model)
    if data:
        Manifest.load(data)  # a raw folder is not a dataset: say so, not "no image matches"
    else:
        _refuse_changed_data(cfg)
    cfg = replace(cfg, data=str(data or cfg.data), metric_images=count or cfg.metric_images)
    class_index = _class_index(cfg, class_name)
    if class_name is not None:
        cfg = replace(cfg, defect_class=class_name)
    reals = metric_reals(cfg)
    if reals.shape[-1] != cfg.channels:
        raise DataError(
            cfg.data,
            f"holds {reals.shape[-1]}-channel images, but the generator draws {cfg.channels}",
            "score it against a dataset of its channel count (leave out --data for its own)",
        )
    classes = (
        class_index if class_index is not None else cycled_classes(len(reals), cfg.num_classes)
    )
    fakes, drawn = generate_samples(
        generator, cfg, range(METRIC_SEED, METRIC_SEED + len(reals)), class_index=classes
    )
    result = {"images": len(reals), **sliced_wasserstein(reals, fakes)}
    measures = measures_for(cfg, _run_of(Location.of(model)))
    if measures is not None:
        result.update(measures(fakes, drawn))
    if inception:
        result.update(inception_metrics(reals, fakes, inception))
    return result


def _refuse_changed_data(cfg: GanConfig) -> None:
    """Scores against the run's own data compare with the SWD it recorded while training: only
    while that data is still the dataset it learnt from."""
    now = Manifest.load(cfg.data).dataset_id
    if cfg.data_manifest_id and now != cfg.data_manifest_id:
        raise DataError(
            cfg.data,
            f"is no longer the dataset this generator learnt from (dataset id {now}, the run's "
            f"{cfg.data_manifest_id}): it was rebuilt or replaced since",
            "give --data the dataset to score against (its scores are then not comparable with "
            "the run's own), or rebuild the run's data as it was",
        )


def _run_of(model: Location) -> Location | None:
    """The run folder whose presence classifier scores ``model`` (a run or one of its kept
    snapshots), or None: a classifier is then learnt for this score alone."""
    for folder in (model, model.parent.parent):
        if (folder / PRESENCE_FILE).is_file():
            return folder
    return None


SNAPSHOT_METRICS_FILE = "snapshot_metrics.json"


def every_snapshot_metrics(run: str | Path | Location, count: int = 0) -> list[dict]:
    """``generator_metrics`` of every snapshot a run kept (``RUN/snapshots``), in kimg order,
    written to ``RUN/snapshot_metrics.json`` and drawn into the run's plots: a measure added
    after a run (or with another ``count``) then covers its whole history."""
    run = Location.of(run)
    kept = run / SNAPSHOTS_DIR
    snapshots = sorted(
        (kimg_of(name), kept / name)
        for name in kept.subfolders()
        if name.startswith("kimg_") and (kept / name / GENERATOR_FILE).is_file()
    )
    if not snapshots:
        raise DataError(
            kept,
            "no kept snapshots (runs keep them since this version)",
            "score the run's published generator with `gan metrics --model RUN`",
        )
    rows = [{"kimg": kimg, **generator_metrics(folder, count=count)} for kimg, folder in snapshots]
    (run / SNAPSHOT_METRICS_FILE).write_json(rows)
    write_plots(run, rows)
    return rows

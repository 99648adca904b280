"""Generated images -> training data: pseudo-labelling on a Ray Data actor pool, label quality.

``label_synthetic`` writes a labelled synthetic dataset::

    OUT/manifest.json       classes, channels, counts, kept/dropped, labeller and generator ids
    OUT/train/*.parquet     kept rows: source=synthetic, mask, label_confidence, origin
    OUT/labels.csv          every image: confidence, defect fraction, class, kept or why not
    OUT/label_quality.json  the labeller on real val images, raw and after each correction
    OUT/plots/*.png         synthetic images with their masks, confidence histogram, quality bars

Images are labelled in one pass of one actor pool and saved part by part (``PART_ROWS`` ids
in sorted order each); each finished part is kept in ``.OUT.labelling-<key>/`` beside OUT until
the dataset is published, so an interrupted run (the same command again, or `study resume` of a
pipeline) labels only the parts not done.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import asdict
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from defectforge.core.errors import DataError
from defectforge.core.files import require_files, write_json_atomic
from defectforge.core.outputs import GAN_RUN, SEG_RUN, kind_of
from defectforge.core.storage import Location, local_folder
from defectforge.datasets.build import pixel_statistics
from defectforge.datasets.contract import (
    COLUMNS,
    MANIFEST,
    SCHEMA,
    combined_digest,
    contract_row,
    decode_png,
    file_digest,
    only_ids,
    read_split_table,
    run_identity,
    split_location,
)
from defectforge.datasets.leakage import SOURCE_PIXELS, maker_source, write_source_pixels
from defectforge.datasets.lineage import LabellingSection, TrainingSource
from defectforge.datasets.manifest import SYNTHETIC, Manifest
from defectforge.datasets.readers import guess_channels, list_images, pixel_sums, read_image
from defectforge.datasets.twins import pixel_digest
from defectforge.datasets.writer import check_derived_output, write_dataset
from defectforge.segmentation.checkpoint import CONFIG_FILE, MODEL_FILE, load_model
from defectforge.segmentation.config import SegConfig
from defectforge.segmentation.inference import predict_batch_logits, predict_logits
from defectforge.segmentation.metrics import confusion_matrix, summarize
from defectforge.segmentation.pseudo_label import Corrections, LabelConfig, correct, pseudo_label
from defectforge.segmentation.report import (
    plot_confidence_histogram,
    plot_correction_quality,
    plot_label_grid,
)
from defectforge.trainables.data_jobs import parquet_dataset, read_split
from defectforge.trainables.runtime import ensure_ray, worker_cpus

# The labelling output: the contract's columns plus what the report and the filter need.
LABELLED_SCHEMA = pa.schema(
    [
        *SCHEMA,
        pa.field("defect_fraction", pa.float32()),
        pa.field("rejected", pa.string()),
        pa.field("pixel_sum", pa.list_(pa.float64())),
        pa.field("pixel_sumsq", pa.list_(pa.float64())),
    ]
)
# Rows of the labeller's own val split travel through the labelling pool beside the generated
# images (one model load per labelling): marked on the way in, and on the way out they carry one
# flattened confusion matrix per correction variant instead of a label.
SCORED = "scored"
CONFUSIONS = "confusions"
POOL_SCHEMA = LABELLED_SCHEMA.append(
    pa.field(CONFUSIONS, pa.map_(pa.string(), pa.list_(pa.int64())))
)
GRID_ROWS = 16
BATCHES_PER_BLOCK = 4
# Images per saved part: at most this much labelling is lost to an interruption.
PART_ROWS = 512
PARTS_PREFIX = ".{name}.labelling-"


def _device(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu else "cpu")


def _actor_input(rows: ray.data.Dataset, cfg: LabelConfig) -> ray.data.Dataset:
    """Rows in blocks of a few batches: one block goes to one actor, so a single-file input
    would otherwise keep all but one actor idle."""
    return rows.repartition(
        target_num_rows_per_block=cfg.batch_size * BATCHES_PER_BLOCK
    ).materialize()


class _Labeller:
    """Ray Data actor: loads the labeller once, then labels the generated rows of each batch and
    scores its ``SCORED`` rows (real val images) against their masks."""

    def __init__(self, cfg: dict, size: tuple[int, int], labeller_id: str):
        self.cfg = LabelConfig.from_dict(cfg)
        self.model, self.seg = load_model(self.cfg.labeller, _device(self.cfg.use_gpu))
        self.size, self.labeller_id = size, labeller_id
        self.variants = quality_variants(self.cfg.corrections)
        self.binary = self.cfg.binary or self.seg.binary
        self.num_classes = 2 if self.binary else len(self.seg.classes)

    def _image(self, cell: bytes) -> np.ndarray:
        image = decode_png(cell, self.seg.channels)
        height, width = self.size
        if image.shape[:2] != (height, width):
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)
        return image.reshape(height, width, self.seg.channels)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        generated = [row for row in rows if not row[SCORED]]
        scored = [self._confusions(row) for row in rows if row[SCORED]]
        return pa.Table.from_pylist(
            (self._labelled(generated) if generated else []) + scored, schema=POOL_SCHEMA
        )

    def _labelled(self, rows: list[dict]) -> list[dict]:
        images = np.stack([self._image(row["image"]) for row in rows])
        logits = predict_batch_logits(self.model, self.seg.batch_spec(), images)
        probabilities = torch.softmax(logits, dim=1).numpy()
        labelled = []
        for row, image, probs in zip(rows, images, probabilities, strict=True):
            label = pseudo_label(
                probs,
                tuple(self.seg.output_classes),
                self.cfg.corrections,
                self.cfg.min_confidence,
                self.cfg.binary,
            )
            labelled.append(
                {
                    **contract_row(
                        id=row["id"],
                        image=image,
                        mask=label.mask,
                        dataset=row["dataset"],
                        origin=f"{row['origin']}|labeller:{self.labeller_id}",
                        defect_class=label.defect_class,
                        label_confidence=label.confidence,
                    ),
                    "defect_fraction": label.defect_fraction,
                    "rejected": label.rejected,
                    **pixel_sums(image),
                }
            )
        return labelled

    def _confusions(self, row: dict) -> dict:
        """A real image at its own size against its mask: one confusion matrix per variant."""
        image = decode_png(row["image"], self.seg.channels)
        truth = torch.from_numpy(decode_png(row["mask"], 0).astype(np.int64))
        raw = predict_logits(self.model, self.seg.batch_spec(), image).argmax(0).numpy()
        matrices = {}
        for name, corrections in self.variants.items():
            pred = torch.from_numpy(correct(raw.astype(np.uint8), corrections).astype(np.int64))
            target = truth
            if self.binary:
                pred, target = (pred > 0).long(), (truth > 0).long()
            matrices[name] = confusion_matrix(pred, target, self.num_classes).ravel().tolist()
        return {"id": row["id"], CONFUSIONS: matrices}


def _label_classes(cfg: LabelConfig, seg: SegConfig) -> tuple[str, ...]:
    return ("background", "defect") if cfg.binary else seg.output_classes


def quality_variants(corrections: Corrections) -> dict[str, Corrections]:
    """Raw prediction, each correction on its own, and the configured combination."""
    variants = {"raw": Corrections(fill_holes=False)}
    for step in ("fill_holes", "closing", "min_area"):
        alone = corrections.only(step)
        if alone.steps():
            variants[step] = alone
    if len(corrections.steps()) > 1:
        variants["+".join(corrections.steps())] = corrections
    return variants


def _actor_options(cfg: LabelConfig) -> dict:
    """The actor pool: ``cfg.actors`` copies, each with its GPU, or a CPU share that leaves
    Ray Data's tasks room beside them."""
    resources = (
        {"num_gpus": 1}
        if cfg.use_gpu
        else {"num_cpus": worker_cpus(cfg.actors, what="labelling actors")}
    )
    return {
        "compute": ray.data.ActorPoolStrategy(size=cfg.actors),
        "batch_size": cfg.batch_size,
        "batch_format": "pyarrow",
        **resources,
    }


def _quality(totals: dict[str, np.ndarray], names: list[str]) -> dict:
    """IoU of the labeller on its val split per correction variant, from summed matrices."""
    k = len(names)
    return {name: summarize(total.reshape(k, k), names) for name, total in totals.items()}


def generated_dataset(
    images: str | Path, input_bits: int = 8
) -> tuple[ray.data.Dataset, Manifest, dict[str, str]]:
    """Rows and manifest of a `gan generate` output (on a disk or a store), or of a plain
    local folder of images (read in ``input_bits``, as the labeller's data was); and, for a
    folder, each row's pixel digest before labelling resizes it, so that copies of real
    held-out images are found at any size (``leakage.check_no_copies``)."""
    if (Location.of(images) / MANIFEST).is_file():
        manifest = Manifest.load(images)
        if manifest.source != SYNTHETIC:
            raise DataError(
                Location.of(images) / MANIFEST,
                f"is a dataset of real images (source {manifest.source}), which have masks",
                "give --images the generated images: `gan generate`'s --out, or a folder of them",
            )
        return read_split(images, "train"), manifest, {}
    images = Path(images)
    if kind_of(images) in (GAN_RUN, SEG_RUN):
        fix = (
            f"write them first: `defectforge gan generate --model {images} --out FOLDER`, then "
            "give --images FOLDER"
            if kind_of(images) == GAN_RUN
            else "give it as --labeller, and --images the generated images"
        )
        raise DataError(images, f"is a {kind_of(images)} folder, not generated images", fix)
    paths = list_images(images)
    channels = guess_channels(paths, input_bits)
    rows, pixels = [], {}
    for path in paths:
        row_id = f"folder/{images.name}/{path.name}"
        image = read_image(path, channels, input_bits=input_bits)
        pixels[row_id] = pixel_digest(image)
        rows.append(
            contract_row(
                id=row_id, image=image, mask=None, dataset=images.name, origin=str(path.resolve())
            )
        )
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    files = combined_digest({path.name: file_digest(path) for path in paths})
    manifest = Manifest.generated(
        f"folder-{images.name}",
        ("background", "defect"),
        channels,
        {"folder": str(images), "files": files},
        input_bits=input_bits,
    )
    return ray.data.from_arrow(table), manifest, pixels


def common_size(data: str | Path) -> tuple[int, int]:
    """The most frequent (height, width) of a dataset's train images."""
    table = read_split_table(data, "train", columns=["height", "width"])
    sizes = Counter(zip(table["height"].to_pylist(), table["width"].to_pylist(), strict=True))
    return sizes.most_common(1)[0][0]


def _automatic_size(seg: SegConfig, generated: Manifest) -> tuple[int, int]:
    """Native-scale GAN crops are labelled as they are; whole images resized by the GAN are
    brought back to the real images' size."""
    gan = generator_config(generated) or {}
    if gan.get("native_crops"):
        return (gan["resolution"], gan["resolution"])
    if not split_location(seg.data, "train").is_dir():
        raise DataError(
            seg.data,
            "the labeller's training data is not here, so the image size is unknown",
            "pass --size HxW (the size of your real images)",
        )
    return common_size(seg.data)


def _labeller_config(cfg: LabelConfig) -> SegConfig:
    folder = require_files(
        local_folder(cfg.labeller), (CONFIG_FILE, MODEL_FILE), "defectforge seg train"
    )
    return SegConfig.load(folder / CONFIG_FILE)


def _check_channels(cfg: LabelConfig, seg: SegConfig, images_channels: int) -> None:
    if seg.channels != images_channels:
        raise DataError(
            cfg.images,
            f"images have {images_channels} channel(s) but the labeller {cfg.labeller} was "
            f"trained on {seg.channels}",
            f"label with a segmentation model trained on {images_channels}-channel images",
        )


def _labels_csv(summary: list[dict]) -> bytes:
    buffer = io.StringIO()
    fields = ["id", "origin", "defect_class", "label_confidence", "defect_fraction", "rejected"]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(summary)
    return buffer.getvalue().encode()


def _kept_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table["rejected"], "")).select(list(COLUMNS)).cast(SCHEMA)


def _labelled_manifest(
    cfg: LabelConfig, seg: SegConfig, generated: Manifest, summary: list[dict], ids: dict
) -> Manifest:
    kept = [row for row in summary if not row["rejected"]]
    mean, std = pixel_statistics(kept, seg.channels) if kept else ([], [])
    confidences = [row["label_confidence"] for row in summary]
    labelling = LabellingSection(
        config=asdict(cfg),
        trained_on=_trained_on(seg, generated),
        labeller=ids["labeller"],
        labeller_data_id=seg.data_manifest_id,
        generated_dataset_id=generated.dataset_id,
        generator=generated.generation.generator if generated.generation else None,
        size=list(ids["size"]),
        images=len(summary),
        kept=len(kept),
        kept_ids_digest=combined_digest({row["id"]: "" for row in kept}),
        dropped=dict(Counter(row["rejected"] for row in summary if row["rejected"])),
        confidence_quartiles=np.quantile(confidences, [0.25, 0.5, 0.75]).tolist(),
    )
    return generated.labelled(
        _label_classes(cfg, seg),
        cfg.binary or seg.binary,
        labelling,
        channels=seg.channels,
        pixel_mean=tuple(mean),
        pixel_std=tuple(std),
    )


def _trained_on(seg: SegConfig, generated: Manifest) -> tuple[TrainingSource, ...]:
    """The datasets the labeller and (for GAN images) the GAN learnt from, with their train ids."""
    sources = [maker_source("labeller", seg.data, seg.data_manifest_id)]
    gan = generator_config(generated)
    if gan is not None:
        sources.append(maker_source("GAN", gan["data"], gan.get("data_manifest_id", "")))
    return tuple(sources)


def generator_config(generated: Manifest) -> dict | None:
    """The GAN config that made a generated set (None for images from a folder)."""
    return generated.generation.gan_config if generated.generation else None


def _tagged(rows: ray.data.Dataset, scored: bool) -> ray.data.Dataset:
    """Contract rows marked to be labelled (generated images) or scored (real val images)."""
    schema = SCHEMA.append(pa.field(SCORED, pa.bool_()))

    def tag(table: pa.Table) -> pa.Table:
        # A block an id filter left empty can come back without columns.
        if not table.num_rows:
            return schema.empty_table()
        table = table.select(list(COLUMNS)).cast(SCHEMA)
        return table.append_column(SCORED, pa.array([scored] * table.num_rows, pa.bool_()))

    return rows.map_batches(tag, batch_format="pyarrow")


def _pool_input(rows: ray.data.Dataset | None, scored: ray.data.Dataset | None) -> ray.data.Dataset:
    """The rows to label and the rows to score, tagged, as one dataset (either may be None)."""
    tagged = [
        _tagged(data, flag) for data, flag in ((rows, False), (scored, True)) if data is not None
    ]
    # Ray Data cannot execute a union of one dataset.
    return tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]


def label_rows(
    cfg: LabelConfig,
    rows: ray.data.Dataset | None,
    size: tuple[int, int],
    labeller_id: str,
    scored: ray.data.Dataset | None = None,
) -> ray.data.Dataset:
    """``rows`` (contract schema) labelled by ``cfg.actors`` copies of the labeller, and the
    ``scored`` rows (real images with masks) scored in the same pass, lazily (``POOL_SCHEMA``:
    a scored row holds its id and confusion matrices only)."""
    return _actor_input(_pool_input(rows, scored), cfg).map_batches(
        _Labeller,
        fn_constructor_kwargs={"cfg": asdict(cfg), "size": size, "labeller_id": labeller_id},
        **_actor_options(cfg),
    )


def _part_file(parts: Location, index: int, ids: tuple[str, ...]) -> Location:
    return parts / f"part-{index:05d}-{combined_digest(dict.fromkeys(ids, ''))[:12]}.parquet"


def labelled_parts(
    cfg: LabelConfig,
    seg: SegConfig,
    rows: ray.data.Dataset,
    size: tuple[int, int],
    labeller_id: str,
    parts: Location,
) -> tuple[ray.data.Dataset, dict | None]:
    """``rows`` labelled part by part, each part saved in ``parts`` when done; parts found there
    (an interrupted run of the same labelling) are read, not labelled again. With them, the
    labeller's quality on its own val split (None where it has none), scored in the same pass."""
    rows = rows.materialize()  # read once: the labelling pass filters these rows, not the files
    ids = sorted(row["id"] for row in rows.select_columns(["id"]).take_all())
    chunks = [tuple(ids[start : start + PART_ROWS]) for start in range(0, len(ids), PART_ROWS)]
    files = [_part_file(parts, index, chunk) for index, chunk in enumerate(chunks)]
    missing = {path: chunk for path, chunk in zip(files, chunks, strict=True) if not path.is_file()}
    val = read_split(seg.data, "val") if split_location(seg.data, "val").is_dir() else None
    totals = _label_missing_parts(cfg, rows, val, size, labeller_id, missing)
    quality = _quality(totals, list(_label_classes(cfg, seg))) if val is not None else None
    return parquet_dataset([path.uri for path in files], LABELLED_SCHEMA), quality


def _label_missing_parts(
    cfg: LabelConfig,
    rows: ray.data.Dataset,
    val: ray.data.Dataset | None,
    size: tuple[int, int],
    labeller_id: str,
    missing: dict[Location, tuple[str, ...]],
) -> dict[str, np.ndarray]:
    """One pass of one actor pool over the rows of every missing part and over ``val`` (the
    actors load the labeller once, not once per part or per task); each part is saved when its
    last row is in; returns the val rows' confusion matrices summed per correction variant. The
    rows go in as they were written, which is in id order for a generated set (zero-padded
    seeds) and a folder (sorted names), so parts mostly finish one after another without a
    sort, which would move every image through an all-to-all exchange."""
    part_of = {row_id: path for path, chunk in missing.items() for row_id in chunk}
    if not part_of and val is None:
        return {}
    to_label = None  # every part saved: the pool scores val alone
    if part_of:
        to_label = rows
        if len(part_of) < rows.count():
            to_label = rows.map_batches(
                partial(only_ids, ids=tuple(part_of)), batch_format="pyarrow"
            )
    waiting: dict[Location, list[pa.Table]] = {path: [] for path in missing}
    left = {path: len(chunk) for path, chunk in missing.items()}
    totals: dict[str, np.ndarray] = {}
    pool = label_rows(cfg, to_label, size, labeller_id, val)
    for block in pool.iter_batches(batch_size=None, batch_format="pyarrow"):
        # An empty block can come back without columns: only rows count.
        if not block.num_rows:
            continue
        block = block.cast(POOL_SCHEMA)
        is_scored = pc.is_valid(block.column(CONFUSIONS))
        for matrices in block.filter(is_scored).column(CONFUSIONS).to_pylist():
            for name, values in matrices:
                totals[name] = totals.get(name, 0) + np.asarray(values, np.int64)
        block = block.filter(pc.invert(is_scored)).drop_columns([CONFUSIONS])
        paths = [part_of[row_id] for row_id in block.column("id").to_pylist()]
        for path in dict.fromkeys(paths):
            taken = block.take([i for i, owner in enumerate(paths) if owner == path])
            waiting[path].append(taken)
            left[path] -= taken.num_rows
            if not left[path]:
                _save_part(path, pa.concat_tables(waiting.pop(path)))
    if waiting:
        short = sum(left[path] for path in waiting)
        raise DataError(
            f"labelling {cfg.images}: the labeller returned {short} rows fewer than it was given "
            "(duplicate image ids?); nothing was published, run the command again"
        )
    return totals


def _save_part(path: Location, table: pa.Table) -> None:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    path.write_bytes(buffer.getvalue().to_pybytes())


# LabelConfig options that change how fast labels come, not what they are.
SPEED_OPTIONS = ("actors", "batch_size", "use_gpu")


def _parts_folder(
    out: Location, cfg: LabelConfig, generated: Manifest, labeller_id: str
) -> Location:
    """Where an interrupted labelling of exactly this input, labeller and output-deciding
    config left its parts."""
    settings = {k: v for k, v in json.loads(cfg.to_json()).items() if k not in SPEED_OPTIONS}
    key = combined_digest(
        {
            "config": json.dumps(settings, sort_keys=True),
            "images": generated.dataset_id,
            "labeller": labeller_id,
        }
    )[:12]
    return out.parent / f"{PARTS_PREFIX.format(name=out.name)}{key}"


def label_synthetic(cfg: LabelConfig, out: str | Path, overwrite: bool = False) -> dict:
    """Label generated images with a trained segmentation model; keep the confident ones."""
    check_derived_output(out, overwrite, (cfg.images, cfg.labeller))
    ensure_ray()
    seg = _labeller_config(cfg)
    generated, source, source_pixels = generated_dataset(cfg.images, seg.input_bits)
    _check_channels(cfg, seg, source.channels)
    size = tuple(cfg.size) or _automatic_size(seg, source)
    labeller_id = run_identity(cfg.labeller, MODEL_FILE)
    out = Location.of(out)
    parts = _parts_folder(out, cfg, source, labeller_id)
    with write_dataset(out, overwrite, inputs=(cfg.images, cfg.labeller)) as staging:
        labelled, quality = labelled_parts(cfg, seg, generated, size, labeller_id, parts)
        labelled = labelled.materialize()
        summary = labelled.drop_columns(["image", "mask"]).take_all()
        if any(not row["rejected"] for row in summary):
            staging.write_split("train", labelled.map_batches(_kept_rows, batch_format="pyarrow"))
        staging.path("labels.csv").write_bytes(_labels_csv(summary))
        kept = {row["id"] for row in summary if not row["rejected"]}
        write_source_pixels(staging.path(SOURCE_PIXELS), source_pixels, kept)
        if quality is not None:
            write_json_atomic(staging.path("label_quality.json"), quality)
            plot_correction_quality(quality, staging.path("plots/label_quality.png"))
        plot_confidence_histogram(
            [row["label_confidence"] for row in summary],
            cfg.min_confidence,
            staging.path("plots/confidence.png"),
        )
        grid_rows = labelled.limit(GRID_ROWS).take_all()
        plot_label_grid(grid_rows, seg.channels, staging.path("plots/synthetic_labels.png"))
        staging.publish(
            _labelled_manifest(cfg, seg, source, summary, {"labeller": labeller_id, "size": size})
        )
    for name in out.parent.children():
        if name.startswith(PARTS_PREFIX.format(name=out.name)):
            (out.parent / name).delete()  # this run's parts, and any other run's
    return {"manifest": staging.manifest, "quality": quality}

"""Ray Data jobs over the Parquet contract: build from raw folders, offline augmentation, reading."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from defectforge.datasets.augment import augment_pair, paper_augmentation
from defectforge.datasets.build import (
    BuildConfig,
    RowLoader,
    check_rejections,
    discover,
    make_manifest,
)
from defectforge.datasets.contract import (
    COLUMNS,
    SCHEMA,
    SPLITS,
    combined_digest,
    decode_png,
    encode_png,
    publish_dir,
    read_manifest,
    split_dir,
)
from defectforge.datasets.errors import DataError
from defectforge.datasets.files import write_json_atomic
from defectforge.trainables.runtime import ensure_ray

LOAD_BATCH = 32
ROWS_PER_FILE = 1024
# Splits this process may not read (comma-separated): a study's search seals "test".
SEALED_SPLITS_ENV = "DEFECTFORGE_SEALED_SPLITS"


@contextlib.contextmanager
def sealed_splits(*splits: str) -> Iterator[None]:
    """While inside, ``read_split`` refuses these splits in this process."""
    previous = os.environ.get(SEALED_SPLITS_ENV)
    os.environ[SEALED_SPLITS_ENV] = ",".join(splits)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SEALED_SPLITS_ENV, None)
        else:
            os.environ[SEALED_SPLITS_ENV] = previous


def read_split(root: str | Path, split: str) -> ray.data.Dataset:
    """One split of a built dataset as a Ray Dataset (raises if the split is empty or missing,
    or sealed by ``sealed_splits``)."""
    folder = split_dir(root, split)
    if split in os.environ.get(SEALED_SPLITS_ENV, "").split(","):
        raise DataError(
            folder,
            f"the {split} split is sealed while a study searches (only train and val are read)",
            "it is read once, by the study's final step",
        )
    if not folder.is_dir():
        raise DataError(
            folder,
            f"dataset has no {split} split",
            "rebuild it with split ratios that give this split some samples",
        )
    return ray.data.read_parquet(str(folder), schema=SCHEMA)


def _rows_of_split(table: pa.Table, split: str) -> pa.Table:
    """The good rows of one split, in exactly the contract's schema."""
    keep = pc.and_(pc.equal(table["split"], split), pc.equal(table["rejected"], ""))
    return table.filter(keep).select(list(COLUMNS)).cast(SCHEMA)


def _write_splits(dataset: ray.data.Dataset, staging: Path, counts: dict) -> None:
    for split in SPLITS:
        if counts[split]["total"]:
            part = dataset.map_batches(partial(_rows_of_split, split=split), batch_format="pyarrow")
            part.write_parquet(str(staging / split), min_rows_per_file=ROWS_PER_FILE)


def build_parquet(cfg: BuildConfig) -> dict:
    """Read, check and write a dataset; the final folder appears only when all of it is written."""
    refs, spec = discover(cfg)
    ensure_ray()
    loaded = (
        ray.data.from_items([asdict(ref) for ref in refs])
        .map_batches(
            RowLoader(spec),
            batch_size=LOAD_BATCH,
            batch_format="numpy",
            zero_copy_batch=True,
            compute=ray.data.TaskPoolStrategy(),
        )
        .materialize()
    )
    summary = loaded.drop_columns(["image", "mask"]).take_all()
    with publish_dir(cfg.out, cfg.overwrite) as staging:
        good = check_rejections(summary, cfg, staging)
        manifest = make_manifest(cfg, spec, good, len(summary) - len(good))
        _write_splits(loaded, staging, manifest["counts"])
        write_json_atomic(staging / "manifest.json", manifest)
    return manifest


def _expand(batch: pa.Table, factor: int, strength: float, seed: int, channels: int) -> pa.Table:
    """Each row once as it is, plus ``factor - 1`` augmented copies with derived ids."""
    rows = []
    for row in batch.to_pylist():
        rows.append(row)
        image, mask = decode_png(row["image"], channels), decode_png(row["mask"], 0)
        for copy in range(1, factor):
            transform = paper_augmentation(strength, seed=_copy_seed(seed, row["id"], copy))
            aug_image, aug_mask = augment_pair(transform, image, mask)
            rows.append(
                {
                    **row,
                    "id": f"{row['id']}#aug{copy:02d}",
                    "image": encode_png(aug_image),
                    "mask": encode_png(aug_mask),
                    "height": aug_image.shape[0],
                    "width": aug_image.shape[1],
                    "origin": f"{row['id']}|aug:{seed}:{copy}",
                }
            )
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _copy_seed(seed: int, sample_id: str, copy: int) -> int:
    return int(np.random.default_rng([seed, copy, *sample_id.encode()]).integers(2**31))


def _scaled_counts(counts: dict, factor: int) -> dict:
    return {
        "total": counts["total"] * factor,
        "by_source": {k: v * factor for k, v in counts["by_source"].items()},
        "by_class": {k: v * factor for k, v in counts["by_class"].items()},
    }


def augment_parquet(
    data: str | Path,
    out: str | Path,
    factor: int = 15,
    strength: float = 1.0,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """The paper's offline expansion of the train split (val and test are copied unchanged)."""
    if factor < 1:
        raise ValueError(f"--factor must be >= 1, got {factor}")
    paper_augmentation(strength)
    manifest = read_manifest(data)
    ensure_ray()
    with publish_dir(out, overwrite) as staging:
        counts = {}
        for split in SPLITS:
            if not manifest["counts"][split]["total"]:
                counts[split] = manifest["counts"][split]
                continue
            dataset = read_split(data, split)
            if split == "train":
                dataset = dataset.map_batches(
                    partial(
                        _expand,
                        factor=factor,
                        strength=strength,
                        seed=seed,
                        channels=manifest["channels"],
                    ),
                    batch_format="pyarrow",
                    batch_size=8,
                )
            dataset.write_parquet(str(staging / split), min_rows_per_file=ROWS_PER_FILE)
            counts[split] = _scaled_counts(
                manifest["counts"][split], factor if split == "train" else 1
            )
        augmentation = {
            "factor": factor,
            "strength": strength,
            "seed": seed,
            "parent": manifest["dataset_id"],
        }
        derived = {
            **manifest,
            "counts": counts,
            "augmentation": augmentation,
            "dataset_id": combined_digest(
                {"parent": manifest["dataset_id"], "augmentation": repr(augmentation)}
            )[:16],
        }
        write_json_atomic(staging / "manifest.json", derived)
    return derived

"""Few-shot subsets of a built dataset: N train images drawn seeded and stratified by defect class.

The paper's question is about scarcity (163 real training images). ``subset_dataset`` keeps N
train (and optionally M val, K test) rows, in the defect-class proportions of the parent, chosen by a
seeded stable order; with ``rest_as_test`` the rows left out join the test split, so a few-shot
model is judged on thousands of images it never saw. The manifest lists every kept id, and the
normalisation statistics are recomputed from the kept train images only.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from defectforge.datasets.config import TypedConfig, option
from defectforge.datasets.contract import MANIFEST, SPLITS, decode_png, split_dir, split_files
from defectforge.datasets.errors import DataError
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.mix import stratified_ids
from defectforge.datasets.outputs import check_output
from defectforge.datasets.writer import write_dataset

AT_LEAST_ONE = (lambda v: v >= 1, ">= 1")


@dataclass(frozen=True)
class SubsetConfig(TypedConfig):
    kind = "subset config"

    train: int = option(
        MISSING,
        "train images kept, stratified by defect class",
        *AT_LEAST_ONE,
    )
    val: int = option(0, "val images kept, stratified (0: all of them)", lambda v: v >= 0, ">= 0")
    rest_as_test: bool = option(
        False, "train and val images left out join the test split (a large unseen test set)"
    )
    test: int = option(
        0,
        "test images kept, stratified, after --rest-as-test (0: all); bounds evaluation time",
        lambda v: v >= 0,
        ">= 0",
    )
    seed: int = option(0, "which images are drawn")


def _split_table(root: str | Path, split: str) -> pa.Table | None:
    return pq.read_table(split_files(root, split)) if split_dir(root, split).is_dir() else None


def _kept(table: pa.Table, split: str, count: int, seed: int, where: Path) -> list[str]:
    ids = table["id"].to_pylist()
    if count > len(ids):
        raise DataError(
            where,
            f"--{split} {count} asks for more {split} images than the {len(ids)} there are",
            f"ask for at most {len(ids)}",
        )
    classes = dict(zip(ids, table["defect_class"].to_pylist(), strict=True))
    return stratified_ids(classes, count, seed)


def _only(table: pa.Table, ids: list[str], keep: bool) -> pa.Table:
    inside = pc.is_in(table["id"], value_set=pa.array(ids, pa.string()))
    return table.filter(inside if keep else pc.invert(inside))


def _as_test(table: pa.Table) -> pa.Table:
    column = table.schema.get_field_index("split")
    return table.set_column(column, "split", pa.array(["test"] * len(table), pa.string()))


def _pixel_statistics(table: pa.Table, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of the images in ``table``."""
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    pixels = 0
    for cell in table["image"].to_pylist():
        image = decode_png(cell, channels).reshape(-1, channels).astype(np.float64) / 255
        total += image.sum(axis=0)
        total_sq += (image**2).sum(axis=0)
        pixels += len(image)
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - mean**2, 1e-12))
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def subset_dataset(
    data: str | Path, out: str | Path, cfg: SubsetConfig, overwrite: bool = False
) -> Manifest:
    """Write the subset of ``data`` that ``cfg`` asks for; val and test untouched unless asked."""
    check_output(out, overwrite, (data,))
    manifest = Manifest.load(data)
    manifest.require_masks(data, "subset")
    where = Path(data) / MANIFEST
    tables = {split: _split_table(data, split) for split in SPLITS}
    if tables["train"] is None:
        raise DataError(where, "dataset has no train split", "subset a dataset with train images")
    kept = {"train": _kept(tables["train"], "train", cfg.train, cfg.seed, where)}
    if cfg.val and tables["val"] is not None:
        kept["val"] = _kept(tables["val"], "val", cfg.val, cfg.seed, where)
    left_out = [_only(tables[split], ids, keep=False) for split, ids in kept.items()]
    with write_dataset(out, overwrite, inputs=(data,)) as staging:
        for split in ("train", "val"):
            if split in kept:
                tables[split] = _only(tables[split], kept[split], keep=True)
        if cfg.rest_as_test:
            parts = [t for t in (tables["test"], *map(_as_test, left_out)) if t is not None]
            tables["test"] = pa.concat_tables(parts)
        if cfg.test and tables["test"] is not None:
            kept["test"] = _kept(tables["test"], "test", cfg.test, cfg.seed, where)
            tables["test"] = _only(tables["test"], kept["test"], keep=True)
        for split, table in tables.items():
            if table is not None and len(table):
                staging.write_split(split, table)
        mean, std = _pixel_statistics(tables["train"], manifest.channels)
        listed = {f"{split}_ids": kept.get(split) for split in SPLITS}
        details = {**asdict(cfg), **listed}
        staging.publish(manifest.subset(details, mean, std))
    return staging.manifest

"""Ray Data jobs over the Parquet contract: build, augment and mix datasets, and read splits.

The rows are made here, with Ray Data; ``datasets.writer`` writes and publishes them.
"""

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

from defectforge.core.errors import DataError
from defectforge.core.outputs import DATASET, check_output, scratch_beside
from defectforge.datasets.augment import AugmentConfig, augment_pair, paper_augmentation
from defectforge.datasets.build import (
    BuildConfig,
    RowLoader,
    build_manifest,
    check_defects,
    check_rejections,
    discover,
)
from defectforge.datasets.contract import (
    COLUMNS,
    SCHEMA,
    SPLITS,
    contract_row,
    decode_png,
    only_ids,
    read_split_table,
    split_files,
    split_location,
)
from defectforge.datasets.leakage import check_no_copies
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.mix import Mix, MixConfig, plan_for
from defectforge.datasets.twins import TWINS_FILE, settle_twins
from defectforge.datasets.writer import check_derived_output, derived_from, write_dataset
from defectforge.trainables.runtime import ensure_ray

LOAD_BATCH = 32
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
    """One split of a built dataset as a Ray Dataset (raises if the split is missing, empty,
    damaged, or sealed by ``sealed_splits``)."""
    folder = split_location(root, split)
    if split in os.environ.get(SEALED_SPLITS_ENV, "").split(","):
        raise DataError(
            folder,
            f"the {split} split is sealed while a study searches (only train and val are read)",
            "it is read once, by the study's final step",
        )
    files = split_files(root, split) if folder.is_dir() else []
    if not files:
        raise DataError(
            folder,
            f"dataset has no {split} split",
            "rebuild it with split ratios that give this split some samples",
        )
    return parquet_dataset([file.uri for file in files], SCHEMA)


def parquet_dataset(uris: list[str], schema: pa.Schema) -> ray.data.Dataset:
    """Our Parquet files as a Ray dataset, read by Ray Data's first Parquet reader: the newer one
    (Ray 2.60's default) starts a pool of 32 footer-reading actors for every read, 32 Python
    processes for a handful of files, which made every read of a small split many times slower
    (measured when the change was made: CHANGELOG, Speed)."""
    ray.data.DataContext.get_current().use_datasource_v2 = False
    return ray.data.read_parquet(uris, schema=schema)


def largest_side(root: str | Path, split: str) -> int:
    """The longest side, in pixels, of any image of a split (from its size columns only)."""
    table = read_split_table(root, split, columns=["height", "width"])
    if table is None or not table.num_rows:
        return 0
    return max(pc.max(table[column]).as_py() for column in ("height", "width"))


def train_rows(
    data: str | Path,
    synthetic: str = "",
    mix: MixConfig | None = None,
    defect_oversample: int = 1,
) -> ray.data.Dataset:
    """The train split of ``data``; with a synthetic set and a mix, plus the synthetic rows
    ``datasets.mix`` chose for it; every row with a defect ``defect_oversample`` times."""
    train = read_split(data, "train")
    if synthetic and mix is not None and mix.ratio:
        train = _with_synthetic(train, synthetic, plan_for(data, synthetic, mix))
    if defect_oversample > 1:
        defective = train.map_batches(_defective, batch_format="pyarrow")
        train = train.union(*[defective] * (defect_oversample - 1))
    return train


def _defective(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_valid(table["defect_class"]))


def _with_synthetic(train: ray.data.Dataset, synthetic: str | Path, mix: Mix) -> ray.data.Dataset:
    print(f"train split: {mix.plan.summary()}", flush=True)
    if mix.plan.real_ids:
        train = train.map_batches(partial(only_ids, ids=mix.plan.real_ids), batch_format="pyarrow")
    if not mix.plan.synthetic_ids:
        return train
    chosen = read_split(synthetic, "train").map_batches(
        partial(only_ids, ids=mix.plan.synthetic_ids), batch_format="pyarrow"
    )
    return train.union(chosen)


# --- build --------------------------------------------------------------------------------------


def _rows_of_split(table: pa.Table, split: str, moved: dict[str, str]) -> pa.Table:
    """The good rows of one split, in exactly the contract's schema; ``moved`` gives the rows
    whose split a build changed (id -> split)."""
    splits = [
        moved.get(row_id, given)
        for row_id, given in zip(table["id"].to_pylist(), table["split"].to_pylist(), strict=True)
    ]
    table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(splits))
    keep = pc.and_(pc.equal(table["split"], split), pc.equal(table["rejected"], ""))
    return table.filter(keep).select(list(COLUMNS)).cast(SCHEMA)


def build_parquet(cfg: BuildConfig, out: str | Path, overwrite: bool = False) -> Manifest:
    """Read, check and write a dataset; the folder appears only when all of it is written."""
    check_output(out, overwrite, (cfg.root,), kind=DATASET)
    refs, spec = discover(cfg)
    ensure_ray()
    with write_dataset(out, overwrite, inputs=(cfg.root,)) as staging:
        loaded = (
            ray.data.from_items([asdict(ref) for ref in refs])
            .map_batches(
                RowLoader(spec),
                batch_size=LOAD_BATCH,
                batch_format="numpy",
                zero_copy_batch=True,
                compute=ray.data.TaskPoolStrategy(),
                # The raw files are on this machine, which may be the only node that sees them.
                label_selector={"ray.io/node-id": ray.get_runtime_context().get_node_id()},
            )
            .materialize()
        )
        summary = loaded.drop_columns(["image", "mask"]).take_all()
        good = check_rejections(summary, cfg, staging.path("rejected.csv"))
        check_defects(good, cfg)
        good, twins = settle_twins(good)
        if twins.groups:
            twins.write_csv(staging.path(TWINS_FILE))
        for split in SPLITS:
            if any(row["split"] == split for row in good):
                part = loaded.map_batches(
                    partial(_rows_of_split, split=split, moved=twins.moved),
                    batch_format="pyarrow",
                )
                staging.write_split(split, part)
        staging.publish(build_manifest(cfg, spec, good, len(summary) - len(good), twins))
    return staging.manifest


# --- augment ------------------------------------------------------------------------------------


def _expand(batch: pa.Table, cfg: AugmentConfig, channels: int) -> pa.Table:
    """Each row once as it is, plus ``factor - 1`` augmented copies with derived ids."""
    rows = []
    for row in batch.to_pylist():
        rows.append(row)
        image, mask = decode_png(row["image"], channels), decode_png(row["mask"], 0)
        for copy in range(1, cfg.factor):
            transform = paper_augmentation(cfg.strength, seed=_copy_seed(cfg.seed, row["id"], copy))
            aug_image, aug_mask = augment_pair(transform, image, mask)
            rows.append(
                contract_row(
                    id=f"{row['id']}#aug{copy:02d}",
                    image=aug_image,
                    mask=aug_mask,
                    dataset=row["dataset"],
                    origin=f"{row['id']}|aug:{cfg.seed}:{copy}",
                    source=row["source"],
                    split=row["split"],
                    defect_class=row["defect_class"],
                    label_confidence=row["label_confidence"],
                )
            )
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _copy_seed(seed: int, sample_id: str, copy: int) -> int:
    return int(np.random.default_rng([seed, copy, *sample_id.encode()]).integers(2**31))


def augment_parquet(
    data: str | Path, out: str | Path, cfg: AugmentConfig, overwrite: bool = False
) -> Manifest:
    """The paper's offline expansion of the train split (val and test are copied unchanged)."""
    manifest = derived_from(data, out, overwrite, "augmented")
    ensure_ray()
    with write_dataset(out, overwrite, inputs=(data,)) as staging:
        for split in SPLITS:
            if not manifest.split_total(split):
                continue
            if split == "train":
                expand = partial(_expand, cfg=cfg, channels=manifest.channels)
                rows = read_split(data, split).map_batches(
                    expand, batch_format="pyarrow", batch_size=8
                )
                staging.write_split(split, rows)
            else:
                staging.copy_split(data, split)
        staging.publish(manifest.augmented(cfg.factor, cfg.strength, cfg.seed))
    return staging.manifest


# --- mix ----------------------------------------------------------------------------------------


def mix_datasets(
    real: str | Path,
    synthetic: str | Path,
    cfg: MixConfig,
    out: str | Path,
    augment: AugmentConfig | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write the mixed dataset (val and test copied from the real set, never synthetic); with
    ``augment`` its train split is then expanded offline as by `data augment`."""
    inputs = (real, synthetic)
    check_derived_output(out, overwrite, inputs)
    mix = plan_for(real, synthetic, cfg)
    check_no_copies(real, synthetic)
    ensure_ray()
    if augment is None:
        return _write_mix(real, synthetic, mix, cfg, out, overwrite, inputs)
    with scratch_beside(out) as scratch:
        _write_mix(real, synthetic, mix, cfg, scratch / "mix", False, inputs)
        return augment_parquet(scratch / "mix", out, augment, overwrite)


def _write_mix(real, synthetic, mix: Mix, cfg: MixConfig, out, overwrite: bool, inputs) -> Manifest:
    # The synthetic set is recorded by its dataset id: its path would change the id of a mix
    # whose content did not change.
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("ratio", "synthetic")}
    with write_dataset(out, overwrite, inputs) as staging:
        staging.write_split("train", _with_synthetic(read_split(real, "train"), synthetic, mix))
        for split in SPLITS[1:]:
            staging.copy_split(real, split)
        staging.publish(
            mix.real.mixed(
                mix.synthetic,
                mix.plan.synthetic_ids,
                settings,
                requested_ratio=cfg.ratio,
                achieved_ratio=mix.plan.achieved_ratio,
                real_images=mix.plan.real_rows,
                real_ids=mix.plan.real_ids,
            )
        )
    return staging.manifest

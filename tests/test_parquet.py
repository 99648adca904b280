import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from defectforge.datasets.augment import AugmentConfig
from defectforge.datasets.contract import COLUMNS, SCHEMA, contract_row, decode_png, split_dir
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.readers import read_image


def test_parquet_round_trip_and_manifest(sample_dataset, sample_root):
    manifest = Manifest.load(sample_dataset)
    assert manifest.split_total("train") == 42 and manifest.split_total("val") == 15
    assert manifest.counts["train"].by_class == {
        "inclusion": 14,
        "patches": 14,
        "scratches": 14,
    }
    assert manifest.channels == 1 and manifest.classes[0] == "background"
    assert 0 < manifest.pixel_mean[0] < 1 and len(manifest.inputs["digest"]) == 64
    saved = json.loads((sample_dataset / "manifest.json").read_text())
    assert Manifest.from_dict(saved) == manifest and saved["config"]["source"] == "neu-seg"
    table = pq.read_table(split_dir(sample_dataset, "train"))
    assert table.schema.equals(SCHEMA) and tuple(table.column_names) == COLUMNS
    first = sorted((sample_root / "images" / "train").iterdir())[0].stem
    row = table.filter(pc.equal(table["id"], f"neu-seg/train/{first}")).to_pylist()[0]
    original = read_image(sample_root / "images" / "train" / (row["id"].split("/")[-1] + ".jpg"), 1)
    assert np.array_equal(decode_png(row["image"], 1), original)
    assert row["source"] == "real" and row["split"] == "train" and row["label_confidence"] is None


def test_offline_expansion_multiplies_train_only(ray_session, sample_dataset, tmp_path):
    from defectforge.trainables.data_jobs import augment_parquet

    out = tmp_path / "x3"
    manifest = augment_parquet(sample_dataset, out, AugmentConfig(factor=3, strength=1.0, seed=5))
    train = pq.read_table(split_dir(out, "train"))
    assert train.num_rows == 42 * 3 == manifest.split_total("train")
    assert pq.read_table(split_dir(out, "val")).num_rows == 15
    ids = train["id"].to_pylist()
    assert len(set(ids)) == len(ids) and sum("#aug02" in i for i in ids) == 42
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["augmentation"]["parent"] == Manifest.load(sample_dataset).dataset_id
    assert saved["dataset_id"] != saved["augmentation"]["parent"]


def test_contract_row_encodes_cells_and_refuses_what_the_contract_forbids():
    image = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3)
    mask = np.zeros((6, 4), np.uint8)
    row = contract_row(id="a", image=image, mask=mask, dataset="d", origin="o")
    table = pa.Table.from_pylist([row, {**row, "mask": None}], schema=SCHEMA)
    assert tuple(table.column_names) == COLUMNS and table["mask"].null_count == 1
    assert np.array_equal(decode_png(row["image"], 3), image) and row["channels"] == 3
    assert (row["height"], row["width"], row["source"], row["split"]) == (
        6,
        4,
        "synthetic",
        "train",
    )
    with pytest.raises(ValueError, match=r"a mask of shape \(4, 6\) for an image of \(6, 4\)"):
        contract_row(id="a", image=image, mask=mask.T.copy(), dataset="d", origin="o")
    with pytest.raises(ValueError, match="HxWx1 or HxWx3"):
        contract_row(id="a", image=image[:, :, 0], mask=mask, dataset="d", origin="o")
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        contract_row(id="a", image=image, mask=None, dataset="d", origin="o", split="holdout")
    with pytest.raises(ValueError, match="unknown source 'fake'"):
        contract_row(id="a", image=image, mask=None, dataset="d", origin="o", source="fake")


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os

    from defectforge.core.files import UMASK, atomic_write

    written = atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
    assert written.read_text() == "x"
    assert os.stat(written).st_mode & 0o777 == 0o666 & ~UMASK
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temp file left behind

import shutil

import cv2
import numpy as np
import pytest

from defectforge.datasets.build import BuildConfig, discover
from defectforge.datasets.discover import NEU_SEG_CLASSES, discover_folder, discover_neu_seg
from defectforge.datasets.readers import load_sample, read_image
from defectforge.datasets.samples import SampleSpec, hash_split
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.floors  # .ci/floors runs them at the lowest versions


def test_neu_seg_reader_keeps_splits_and_reads_grey(sample_root):
    refs = discover_neu_seg(sample_root)
    assert {r.split for r in refs} == {"train", "val"}
    assert sum(r.split == "train" for r in refs) == 42
    image = read_image(refs[0].image_path, channels=1)
    assert image.shape == (200, 200, 1) and image.dtype == np.uint8
    row = load_sample(refs[0], SampleSpec("neu-seg", NEU_SEG_CLASSES, 1))
    assert row["defect_class"] in NEU_SEG_CLASSES[1:]
    assert row["height"] == row["width"] == 200


def test_test_fraction_carves_test_from_train_only(sample_root):
    refs = discover_neu_seg(sample_root, test_fraction=0.5)
    carved = [r for r in refs if r.split == "test"]
    assert carved and all(r.id.startswith("neu-seg/train/") for r in carved)
    assert all(r.split == "val" for r in refs if r.id.startswith("neu-seg/val/"))


def test_hash_split_is_deterministic_and_follows_ratios():
    ids = [f"x/{i}" for i in range(3000)]
    splits = [hash_split(i, (0.7, 0.15, 0.15)) for i in ids]
    assert splits == [hash_split(i, (0.7, 0.15, 0.15)) for i in ids]
    share = splits.count("train") / len(ids)
    assert 0.66 < share < 0.74


@pytest.mark.skipif(not (SHARED_DATA / "magnetic-tile").is_dir(), reason="needs ../shared/data")
def test_folder_reader_on_magnetic_tile_soft_masks(tmp_path):
    source = SHARED_DATA / "magnetic-tile"
    for folder in ("MT_Crack", "MT_Free"):
        (tmp_path / folder / "Imgs").mkdir(parents=True)
        for image in sorted((source / folder / "Imgs").glob("*.jpg"))[:3]:
            shutil.copy(image, tmp_path / folder / "Imgs")
            shutil.copy(image.with_suffix(".png"), tmp_path / folder / "Imgs")
    cfg = BuildConfig(
        source="folder",
        root=str(tmp_path),
        mask_threshold=128,
        class_from_folder=True,
        classes=("background", "MT_Crack"),  # MT_Free names no class: its masks are empty
    )
    refs, spec = discover(cfg)
    assert len(refs) == 6 and spec.channels == 1
    rows = [load_sample(r, spec) for r in refs]
    crack = [r for r in rows if "MT_Crack" in r["id"]]
    assert all(r["defect_class"] == "MT_Crack" for r in crack)
    assert all(r["defect_class"] is None for r in rows if "MT_Free" in r["id"])
    sizes = {(r["height"], r["width"]) for r in rows}
    assert len(sizes) > 1  # magnetic-tile images vary in size and are kept native


def test_folder_reader_paired_layout_with_classes_file(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "masks" / "train").mkdir(parents=True)
    image = np.full((40, 48, 3), (10, 200, 90), np.uint8)
    mask = np.zeros((40, 48), np.uint8)
    mask[5:10, 5:20] = 2
    cv2.imwrite(str(tmp_path / "images" / "train" / "a.png"), image)
    cv2.imwrite(str(tmp_path / "masks" / "train" / "a.png"), mask)
    (tmp_path / "classes.yaml").write_text("classes: [background, dent, scratch]\n")
    cfg = BuildConfig(source="folder", root=str(tmp_path))
    refs, spec = discover(cfg)
    assert spec.classes == ("background", "dent", "scratch") and spec.channels == 3
    assert refs[0].split == "train"
    assert load_sample(refs[0], spec)["defect_class"] == "scratch"
    binary = SampleSpec(spec.dataset, spec.classes, 3, binary=True)
    assert load_sample(refs[0], binary)["defect_class"] == "defect"


def test_folder_reader_hash_splits_without_split_folders(tmp_path):
    for i in range(30):
        cv2.imwrite(str(tmp_path / f"s{i}.jpg"), np.zeros((16, 16), np.uint8))
        cv2.imwrite(str(tmp_path / f"s{i}.png"), np.zeros((16, 16), np.uint8))
    refs = discover_folder(tmp_path, "d", (0.5, 0.5, 0.0))
    assert len(refs) == 30 and {r.split for r in refs} == {"train", "val"}

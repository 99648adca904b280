import shutil
from pathlib import Path

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


def _write(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def _cross(value: int) -> np.ndarray:
    mask = np.zeros((16, 16), np.uint8)
    mask[6:10, :] = value
    return mask


def test_masks_are_found_and_left_out_whatever_the_case_of_their_extension(tmp_path):
    from defectforge.datasets.readers import list_images

    grey = np.full((16, 16), 90, np.uint8)
    _write(tmp_path / "same" / "t0.JPG", grey)
    _write(tmp_path / "same" / "t0.PNG", _cross(1))  # a mask beside its image
    _write(tmp_path / "suffix" / "u0.jpg", grey)
    _write(tmp_path / "suffix" / "u0_mask.PNG", _cross(1))
    for root, suffix in ((tmp_path / "same", ""), (tmp_path / "suffix", "_mask")):
        (ref,) = discover_folder(root, "d", (1.0, 0.0, 0.0), suffix)
        assert ref.mask_path is not None and ref.mask_path != ref.image_path
        assert [p.name for p in list_images(root, suffix)] == [Path(ref.image_path).name]


def test_two_images_of_one_name_are_refused_naming_both(tmp_path):
    from defectforge.core.errors import DataError
    from defectforge.datasets.readers import list_images

    for name in ("s0.jpg", "s0.bmp"):
        _write(tmp_path / name, np.full((16, 16), 90, np.uint8))
    _write(tmp_path / "s0_mask.png", _cross(1))
    for find in (
        lambda: discover_folder(tmp_path, "d", (1.0, 0.0, 0.0), "_mask"),
        lambda: list_images(tmp_path, "_mask"),
    ):
        with pytest.raises(DataError, match=r"s0\.jpg: has the same name as .*s0\.bmp.*rename"):
            find()


def test_jpeg_and_palette_masks_are_read(tmp_path):
    from PIL import Image

    _write(tmp_path / "jpeg" / "images" / "a.jpg", np.full((16, 16), 90, np.uint8))
    _write(tmp_path / "jpeg" / "masks" / "a.jpg", _cross(255))  # lossy: read with a threshold
    cfg = BuildConfig(source="folder", root=str(tmp_path / "jpeg"), mask_threshold=128)
    refs, spec = discover(cfg)
    assert load_sample(refs[0], spec)["defect_class"] == "defect"

    _write(tmp_path / "palette" / "b.png", np.full((16, 16), 90, np.uint8))
    indexed = Image.fromarray(_cross(2), mode="L").convert("P")  # indices 0 and 2
    indexed.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    indexed.save(tmp_path / "palette" / "b_mask.png")
    cfg = BuildConfig(
        source="folder",
        root=str(tmp_path / "palette"),
        mask_suffix="_mask",
        classes=("background", "dent", "scratch"),
    )
    refs, spec = discover(cfg)
    assert load_sample(refs[0], spec)["defect_class"] == "scratch"


def test_grey_is_read_as_three_channels_and_an_opaque_alpha_is_dropped(tmp_path):
    from defectforge.core.errors import DataError

    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    _write(tmp_path / "grey.png", grey)
    three = read_image(tmp_path / "grey.png", 3)
    assert three.shape == (16, 16, 3) and all((three[..., c] == grey).all() for c in range(3))
    rgba = np.dstack([grey, grey, np.full_like(grey, 200), np.full_like(grey, 255)])
    _write(tmp_path / "opaque.png", rgba)
    assert (read_image(tmp_path / "opaque.png", 3)[..., 0] == 200).all()  # BGRA -> RGB
    rgba[0, 0, 3] = 0
    _write(tmp_path / "transparent.png", rgba)
    with pytest.raises(DataError, match="transparent alpha"):
        read_image(tmp_path / "transparent.png", 3)
    with pytest.raises(DataError, match="3 colour channels but 1 .* convert it to grey"):
        read_image(tmp_path / "opaque.png", 1)


def test_the_channel_count_comes_from_the_first_readable_image(tmp_path):
    from defectforge.datasets.readers import guess_channels

    (tmp_path / "a.png").write_bytes(b"")
    _write(tmp_path / "b.png", np.full((8, 8, 3), (10, 200, 90), np.uint8))
    assert guess_channels([tmp_path / "a.png", tmp_path / "b.png"]) == 3


def test_a_build_whose_masks_mark_no_defect_is_refused():
    from defectforge.core.errors import DataError
    from defectforge.datasets.build import check_defects

    rows = [{"mask_missing": False, "defect_class": None}] * 3
    cfg = BuildConfig(source="folder", root="parts", mask_threshold=128)
    with pytest.raises(DataError, match="none of the 3 masks .* --mask-threshold 128 is above"):
        check_defects(rows, cfg)
    check_defects(rows + [{"mask_missing": False, "defect_class": "defect"}], cfg)
    check_defects([{"mask_missing": True, "defect_class": None}], cfg)  # defect-free by choice

"""Folders as users lay them out: MVTec AD's ground_truth/ tree, mask folders and split folders
named in any case, class folders at any depth, linked folders, system files beside the images,
camera JPEGs turned by EXIF, and masks the layout would lose without a word."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from defectforge.core.errors import DataError
from defectforge.datasets.build import BuildConfig, check_rejections, discover
from defectforge.datasets.discover import discover_folder
from defectforge.datasets.images import decode_file
from defectforge.datasets.readers import load_sample, read_mask

pytestmark = pytest.mark.floors  # .ci/floors runs them at the lowest versions

RATIOS = (0.5, 0.5, 0.0)


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def _pair(image: Path, mask: Path | None, defect: bool = True) -> None:
    _write(image, np.full((16, 16), 90, np.uint8))
    if mask is not None:
        drawn = np.zeros((16, 16), np.uint8)
        drawn[6:10, :] = 255 if defect else 0
        _write(mask, drawn)


def _by_name(refs) -> dict:
    return {ref.id.split("/", 1)[1]: ref for ref in refs}


def test_mvtec_ad_layout_reads_ground_truth_masks_splits_and_classes(tmp_path):
    root = tmp_path / "bottle"
    for k in range(2):
        _pair(root / "train" / "good" / f"00{k}.png", None)
        _pair(root / "test" / "good" / f"00{k}.png", None)
        for defect in ("crack", "scratch"):
            mask = root / "ground_truth" / defect / f"00{k}_mask.png"
            _pair(root / "test" / defect / f"00{k}.png", mask)
    cfg = BuildConfig(
        source="folder",
        root=str(root),
        mask_suffix="_mask",
        mask_threshold=128,
        class_from_folder=True,
        missing_mask="background",
    )
    refs, spec = discover(cfg)
    found = _by_name(refs)
    assert sorted(found) == sorted(
        f"{split}/{folder}/00{k}"
        for k in range(2)
        for split, folder in (
            ("train", "good"),
            ("test", "good"),
            ("test", "crack"),
            ("test", "scratch"),
        )
    )
    crack = found["test/crack/001"]
    assert crack.mask_path == str(root / "ground_truth" / "crack" / "001_mask.png")
    assert crack.split == "test" and crack.folder_class == "crack"
    assert found["train/good/000"].mask_path is None and found["train/good/000"].split == "train"
    # good/ holds no mask: it names no class
    assert spec.classes == ("background", "crack", "scratch")
    row = load_sample(found["test/scratch/000"], spec)
    assert row["defect_class"] == "scratch"


def test_a_mask_that_matches_no_image_is_refused_naming_it(tmp_path):
    """Masks flat in masks/ for images in subfolders were all left unread: with --missing-mask
    background the build passed, every image defect-free."""
    for k in range(3):
        _pair(tmp_path / "flat" / "images" / "line0" / f"p{k}.png", None)
        _pair(tmp_path / "flat" / "masks" / f"p{k}.png", None)
    with pytest.raises(DataError, match=r"masks/p0\.png: mask matches no image \(3 of 3"):
        discover_folder(tmp_path / "flat", "d", RATIOS)
    _pair(tmp_path / "orphan" / "a.png", tmp_path / "orphan" / "a_mask.png")
    _pair(tmp_path / "orphan" / "gone_mask.png", None)
    with pytest.raises(DataError, match=r"gone_mask\.png: mask matches no image .*plus _mask"):
        discover_folder(tmp_path / "orphan", "d", RATIOS, "_mask")
    for split in ("train", "test"):  # both find masks/crack/000.png once the split is left out
        _pair(tmp_path / "twice" / "images" / split / "crack" / "000.png", None)
    _pair(tmp_path / "twice" / "masks" / "crack" / "000.png", None)
    with pytest.raises(DataError, match=r"000\.png: mask is the one of two images, .*train"):
        discover_folder(tmp_path / "twice", "d", RATIOS)


def test_tree_and_split_folders_are_read_in_any_case_and_common_names(tmp_path):
    for tree, masks in (("Images", "Masks"), ("images", "labels"), ("img", "annotations")):
        root = tmp_path / tree
        for split in ("Train", "Validation", "TEST"):
            _pair(root / tree / split / "a.png", root / masks / split / "a.png")
        refs = discover_folder(root, "d", RATIOS)
        assert len(refs) == 3, [r.image_path for r in refs]  # masks never taken for images
        assert {r.split for r in refs} == {"train", "val", "test"}
        assert all(r.mask_path and masks in r.mask_path for r in refs)


def test_the_class_folder_is_the_innermost_naming_a_class(tmp_path):
    _pair(
        tmp_path / "a" / "line1" / "crack" / "p.png", tmp_path / "a" / "line1" / "crack" / "p_m.png"
    )
    _pair(
        tmp_path / "a" / "line2" / "dent" / "p.png", tmp_path / "a" / "line2" / "dent" / "p_m.png"
    )
    classes = {r.folder_class for r in discover_folder(tmp_path / "a", "d", RATIOS, "_m", True)}
    assert classes == {"crack", "dent"}
    # magnetic-tile: MT_Crack/Imgs/ names its class one level up
    _pair(
        tmp_path / "b" / "MT_Crack" / "Imgs" / "t.jpg",
        tmp_path / "b" / "MT_Crack" / "Imgs" / "t.png",
    )
    (ref,) = discover_folder(tmp_path / "b", "d", RATIOS, "", True)
    assert ref.folder_class == "MT_Crack"
    # a declared class wins over a folder inside it
    _pair(
        tmp_path / "c" / "crack" / "part7" / "p.png", tmp_path / "c" / "crack" / "part7" / "p_m.png"
    )
    (ref,) = discover_folder(
        tmp_path / "c", "d", RATIOS, "_m", True, class_names=frozenset({"crack"})
    )
    assert ref.folder_class == "crack"


def test_hidden_and_system_files_are_not_samples(tmp_path):
    _pair(tmp_path / "p.png", tmp_path / "p_mask.png")
    for junk in (
        "._p.png",
        ".thumbnails/p.png",
        "@eaDir/p.png/SYNOPHOTO_THUMB_S.jpg",
        "__MACOSX/._p.png",
    ):
        _write(tmp_path / junk, np.zeros((4, 4), np.uint8))
    (ref,) = discover_folder(tmp_path, "d", RATIOS, "_mask")
    assert ref.image_path == str(tmp_path / "p.png")


def test_linked_folders_are_followed_once_and_a_broken_link_is_named(tmp_path):
    store = tmp_path / "store"
    _pair(store / "p.png", store / "p_mask.png")
    root = tmp_path / "root"
    _pair(root / "own" / "q.png", root / "own" / "q_mask.png")
    (root / "linked").symlink_to(store, target_is_directory=True)
    (root / "own" / "loop").symlink_to(root, target_is_directory=True)  # must not loop
    refs = discover_folder(root, "d", RATIOS, "_mask")
    assert sorted(_by_name(refs)) == ["linked/p", "own/q"]

    (root / "gone.png").symlink_to(tmp_path / "nowhere.png")
    cfg = BuildConfig(source="folder", root=str(root), mask_suffix="_mask", channels=1)
    refs, spec = discover(cfg)
    with pytest.raises(DataError, match=r"gone\.png: image is a link to .*nowhere\.png, which"):
        load_sample(_by_name(refs)["gone"], spec)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_exif_orientation_is_applied_as_viewers_show_it(orientation, tmp_path):
    """Pillow's exif_transpose is the reference; PNG keeps the comparison exact."""
    rng = np.random.default_rng(orientation)
    picture = Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "camera.png"
    picture.save(path, exif=exif)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    decoded = cv2.cvtColor(decode_file(path), cv2.COLOR_BGR2RGB)
    assert np.array_equal(decoded, shown)


def test_an_exif_turned_camera_jpeg_matches_the_mask_drawn_on_its_view(tmp_path):
    view = np.full((24, 40), 200, np.uint8)
    view[4:8, :] = 20  # a horizontal scratch, as the labelling tool showed it
    stored = np.ascontiguousarray(np.rot90(view, 1))  # the camera stores it turned
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "p.jpg", exif=exif, quality=98)
    mask = (view < 100).astype(np.uint8)
    _write(tmp_path / "p.png", mask)
    refs, spec = discover(BuildConfig(source="folder", root=str(tmp_path), channels=1))
    row = load_sample(refs[0], spec)
    assert (row["height"], row["width"]) == (24, 40) and row["defect_class"] == "defect"


def test_float_multipage_and_alpha_files_get_a_fix_that_works(tmp_path):
    from defectforge.datasets.readers import read_image

    floats = tmp_path / "float.tif"
    Image.fromarray(np.zeros((8, 8), np.float32)).save(floats)
    with pytest.raises(DataError, match="float32 pixels.*save it as an 8-bit image"):
        read_image(floats, 1, input_bits=16)
    pages = tmp_path / "pages.tif"
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (1, 2, 3)]
    frames[0].save(pages, save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match="holds 3 pages, and one image per file is read"):
        read_image(pages, 1)

    spec = discover(BuildConfig(source="folder", root=str(_pair_dir(tmp_path))))[1]
    grey_alpha = np.zeros((8, 8, 2), np.uint8)
    grey_alpha[2:4, :, 0] = 1
    grey_alpha[:, :, 1] = 255  # opaque: the mask it holds is read
    Image.fromarray(grey_alpha, "LA").save(tmp_path / "la.png")
    assert read_mask(tmp_path / "la.png", (8, 8), spec, None).sum() == 16
    grey_alpha[0, 0, 1] = 0
    Image.fromarray(grey_alpha, "LA").save(tmp_path / "la.png")
    with pytest.raises(DataError, match="mask has a transparent alpha channel"):
        read_mask(tmp_path / "la.png", (8, 8), spec, None)


def _pair_dir(tmp_path: Path) -> Path:
    root = tmp_path / "pair"
    _pair(root / "a.jpg", root / "a.png")
    return root


def test_a_build_that_rejects_every_sample_says_why_in_its_line(tmp_path):
    cfg = BuildConfig(source="folder", root=str(tmp_path), skip_bad=True)
    reason = f"{tmp_path}/p.png: image has a transparent alpha channel; save it without alpha"
    rows = [{"id": "d/p", "origin": f"{tmp_path}/p.png", "rejected": reason}]
    with pytest.raises(DataError) as refused:
        check_rejections(rows, cfg, tmp_path / "rejected.csv")
    assert "the first: " in str(refused.value) and "transparent alpha" in str(refused.value)


def test_only_a_build_that_can_skip_advises_skip_bad_and_says_it_once(tmp_path):
    # Readers serve commands without --skip-bad (seg eval, synth label): their fix lacks it.
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(DataError) as unreadable:
        decode_file(tmp_path / "x.png", "image")
    assert "--skip-bad" not in str(unreadable.value)
    cfg = BuildConfig(source="folder", root=str(tmp_path))
    rows = [
        {"id": f"d/{n}", "origin": f"{tmp_path}/{n}.png", "rejected": str(unreadable.value)}
        for n in ("x", "y")
    ]
    for bad, says in ((rows[:1], "(or pass --skip-bad)"), (rows, "2 bad files in all")):
        with pytest.raises(DataError) as refused:
            check_rejections(bad, cfg, tmp_path / "rejected.csv")
        assert says in str(refused.value) and str(refused.value).count("--skip-bad") == 1
    check_rejections(
        [*rows, {"id": "d/z", "rejected": ""}],
        BuildConfig(source="folder", root=str(tmp_path), skip_bad=True),
        tmp_path / "rejected.csv",
    )
    assert "--skip-bad" not in (tmp_path / "rejected.csv").read_text()


def test_webp_images_are_read(tmp_path):
    picture = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    assert cv2.imwrite(str(tmp_path / "p.webp"), picture, [cv2.IMWRITE_WEBP_QUALITY, 101])
    _write(tmp_path / "p.png", np.zeros((16, 24), np.uint8))  # its mask, beside it
    refs, spec = discover(BuildConfig(source="folder", root=str(tmp_path)))
    (ref,) = refs
    assert ref.image_path.endswith("p.webp") and ref.mask_path.endswith("p.png")
    assert spec.channels == 3 and (load_sample(ref, spec)["height"], spec.channels) == (16, 3)


def test_machine_vision_pgm_ppm_and_jpe_images_are_read_with_pgm_and_pbm_masks(tmp_path):
    """Portable anymap files (many industrial cameras and vision libraries save them) and the
    .jpe spelling of JPEG are images; PGM and PBM files are masks beside them."""
    _pair(tmp_path / "line1" / "a.pgm", tmp_path / "line1" / "a_mask.pbm")
    _write(tmp_path / "line1" / "b.ppm", np.full((16, 16, 3), 90, np.uint8))
    _pair(tmp_path / "line1" / "c.jpe", tmp_path / "line1" / "c_mask.pgm")
    refs, spec = discover(
        BuildConfig(
            source="folder",
            root=str(tmp_path),
            mask_suffix="_mask",
            channels=3,
            mask_threshold=128,
            missing_mask="background",
        )
    )
    found = {Path(ref.image_path).name: ref.mask_path for ref in refs}
    assert set(found) == {"a.pgm", "b.ppm", "c.jpe"}
    assert found["a.pgm"].endswith("a_mask.pbm") and found["c.jpe"].endswith("c_mask.pgm")
    assert found["b.ppm"] is None
    for ref in refs:
        sample = load_sample(ref, spec)
        assert (sample["height"], sample["width"]) == (16, 16)

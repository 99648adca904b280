"""Pixel-identical images in a build are kept in one split, so no held-out image has a copy
among the images a model learns from."""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace

import cv2
import numpy as np
from cli_checks import error_lines

from defectforge.cli import main
from defectforge.datasets.contract import decode_png, read_split_table
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.twins import settle_twins


def _row(sample_id: str, split: str, pixels: str, mask: str = "m") -> dict:
    return {"id": sample_id, "split": split, "pixel_digest": pixels, "mask_digest": mask}


def test_each_group_joins_its_most_held_out_split_and_single_images_stay():
    good = [
        _row("a", "train", "p1"),
        _row("b", "test", "p1"),
        _row("c", "val", "p1", mask="other"),
        _row("d", "train", "p2"),
        _row("e", "val", "p2"),
        _row("f", "train", "p3"),
        _row("g", "train", "p4"),
        _row("h", "train", "p4"),
    ]
    settled, twins = settle_twins(good)
    splits = {row["id"]: row["split"] for row in settled}
    assert splits == {
        "a": "test", "b": "test", "c": "test", "d": "val", "e": "val", "f": "train",
        "g": "train", "h": "train",
    }  # fmt: skip
    assert twins.moved == {"a": "test", "c": "test", "d": "val"}
    assert twins.counts() == {"images": 7, "groups": 3, "masks_differ": 1, "moved": 3}
    assert good[0]["split"] == "train"  # the caller's rows are left as they were


def test_a_twin_takes_the_images_of_its_group_by_group_along():
    part = {"split_group": "Part2"}
    good = [
        {**_row("Part2/0", "train", "p1"), **part},
        {**_row("Part2/1", "train", "p2"), **part},
        {**_row("Part12/copy", "val", "p1"), "split_group": "Part12"},
        {**_row("Part3/0", "train", "p3"), "split_group": "Part3"},
    ]
    settled, twins = settle_twins(good)
    assert [row["split"] for row in settled] == ["val", "val", "val", "train"]
    assert [row["id"] for row in twins.companions] == ["Part2/1"]
    assert twins.counts() == {"images": 2, "groups": 1, "masks_differ": 0, "moved": 2}


def test_a_build_keeps_a_copied_image_in_the_held_out_split_and_says_so(
    sample_copy, tmp_path, capsys, ray_session
):
    val_image = sorted((sample_copy / "images" / "val").glob("*.jpg"))[0]
    val_mask = sample_copy / "masks" / "val" / f"{val_image.stem}.png"
    # A byte copy with a mask that disagrees, and a lossless re-save under another format.
    shutil.copy(val_image, sample_copy / "images" / "train" / "copy.jpg")
    cv2.imwrite(str(sample_copy / "masks" / "train" / "copy.png"), np.zeros((200, 200), np.uint8))
    grey = cv2.imread(str(val_image), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(sample_copy / "images" / "train" / "resaved.png"), grey)
    shutil.copy(val_mask, sample_copy / "masks" / "train" / "resaved.png")
    out = tmp_path / "built"

    main(["data", "build", "--source", "neu-seg", "--root", str(sample_copy), "--out", str(out)])

    warning = [line for line in capsys.readouterr().err.splitlines() if "pixel-identical" in line]
    assert (
        len(warning) == 1 and "3 images" in warning[0] and "1 with masks that differ" in warning[0]
    )
    assert "2 moved split" in warning[0] and "twins.csv" in warning[0]
    manifest = Manifest.load(out)
    assert manifest.twins == {"images": 3, "groups": 1, "masks_differ": 1, "moved": 2}
    val_ids = set(read_split_table(out, "val", ["id"])["id"].to_pylist())
    train_ids = set(read_split_table(out, "train", ["id"])["id"].to_pylist())
    copies = {"neu-seg/train/copy", "neu-seg/train/resaved", f"neu-seg/val/{val_image.stem}"}
    assert copies <= val_ids and not copies & train_ids
    assert manifest.split_total("val") == 15 + 2 and manifest.split_total("train") == 42
    with open(out / "twins.csv") as handle:
        listed = list(csv.DictReader(handle))
    assert {row["id"] for row in listed} == copies
    assert {row["split"] for row in listed} == {"val"} and listed[0]["masks_differ"] == "True"


def test_a_synthetic_set_holding_a_copy_of_a_held_out_image_is_refused(
    sample_dataset, labeller, tmp_path, capsys
):
    """Labelled at another size (the stored image is no copy, the image read from the folder
    is), and combined with another set (the record travels)."""
    from conftest import SAMPLE, _labelled_set

    from defectforge.datasets.combine import CombineConfig, combine_synthetic

    train_images = sorted((SAMPLE / "images" / "train").glob("*.jpg"))
    val_image = sorted((SAMPLE / "images" / "val").glob("*.jpg"))[0]
    folders = {"unlabelled": train_images[:2] + [val_image], "more": train_images[2:5]}
    labelled = []
    for name, sources in folders.items():
        (tmp_path / name).mkdir()
        for source in sources:
            # Copies of train images leak nothing; named to come first, they would be named if
            # they did.
            target = "extra.jpg" if source == val_image else f"a-train-{source.name}"
            shutil.copy(source, tmp_path / name / target)
        labelled.append(
            _labelled_set(tmp_path / name, labeller, tmp_path / f"{name}-set", size=(96, 96))
        )
    stored = read_split_table(labelled[0], "train")["image"][0].as_py()
    assert decode_png(stored, 1).shape == (96, 96, 1)
    combined = tmp_path / "combined"
    combine_synthetic([str(path) for path in labelled], str(combined), CombineConfig())

    capsys.readouterr()
    mix = ["data", "mix", "--real", str(sample_dataset), "--synthetic", str(combined)]
    assert main([*mix, "--ratio", "0.05", "--out", str(tmp_path / "mixed")]) == 2
    message = error_lines(capsys.readouterr().err)[-1]
    assert message.startswith(f"defectforge: error: {tmp_path / 'unlabelled' / 'extra.jpg'}: ")
    assert f"neu-seg/val/{val_image.stem} in {sample_dataset}'s val split" in message
    assert not (tmp_path / "mixed").exists()


def test_a_group_never_takes_images_out_of_a_folder_named_for_a_split(tmp_path):
    from defectforge.datasets.discover import discover_folder

    for split in ("train", "test"):
        (tmp_path / split / "P2").mkdir(parents=True)
        cv2.imwrite(str(tmp_path / split / "P2" / "a.png"), np.zeros((4, 4), np.uint8))
    hashed = tmp_path / "hashed" / "P2"
    hashed.mkdir(parents=True)
    cv2.imwrite(str(hashed / "b.png"), np.zeros((4, 4), np.uint8))
    refs = discover_folder(tmp_path, "own", (0.7, 0.15, 0.15), group_by="parent")
    groups = {ref.id: ref.split_group for ref in refs}
    assert groups == {"own/train/P2/a": None, "own/test/P2/a": None, "own/hashed/P2/b": "hashed/P2"}


def test_a_derived_dataset_does_not_repeat_the_builds_twin_counts(sample_dataset):
    built = Manifest.load(sample_dataset)
    counted = replace(built, twins={"images": 2, "groups": 1})
    assert counted.to_dict()["twins"] == {"images": 2, "groups": 1}
    augmented = counted.augmented(factor=2, strength=0.5, seed=0)
    assert augmented.twins == {} and "twins" not in augmented.to_dict()

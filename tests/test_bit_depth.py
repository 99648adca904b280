"""Images of more than 8 bits (10-16 bits in 16-bit files, as industrial cameras save them) are
shifted to 8 bits by one scale for the whole set, and every model of that set reads them so."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
from cli_checks import error_lines

from defectforge.cli import main
from defectforge.core.errors import DataError
from defectforge.datasets.contract import decode_png, read_split_table
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.readers import read_image, read_mask
from defectforge.datasets.samples import SampleSpec


def _write_12_bit_copy(source, target) -> None:
    """``source``'s NEU-Seg tree with every image as a 12-bit value in a 16-bit PNG."""
    shutil.copytree(source / "masks", target / "masks")
    for image in sorted((source / "images").rglob("*.jpg")):
        grey = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE).astype(np.uint16) << 4
        out = target / "images" / image.parent.name / f"{image.stem}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), grey)


def _pixels_by_stem(dataset, split: str) -> dict[str, bytes]:
    table = read_split_table(dataset, split, ["id", "image"])
    return {
        sample_id.rsplit("/", 1)[-1]: decode_png(cell, 1).tobytes()
        for sample_id, cell in zip(table["id"].to_pylist(), table["image"].to_pylist(), strict=True)
    }


def test_a_12_bit_image_is_shifted_and_other_depths_are_refused_naming_the_option(tmp_path):
    values = np.array([[0, 16, 4095], [255, 256, 4000]], np.uint16)
    cv2.imwrite(str(tmp_path / "twelve.png"), values)
    read = read_image(tmp_path / "twelve.png", 1, input_bits=12)[:, :, 0]
    assert read.dtype == np.uint8 and read.tolist() == [[0, 1, 255], [15, 16, 250]]

    with pytest.raises(DataError, match="--input-bits"):
        read_image(tmp_path / "twelve.png", 1)  # 8 bits asked for
    with pytest.raises(DataError, match="above the 10-bit maximum 1023"):
        read_image(tmp_path / "twelve.png", 1, input_bits=10)
    cv2.imwrite(str(tmp_path / "eight.png"), values.astype(np.uint8))
    with pytest.raises(DataError, match="12-bit images in 16-bit files are expected"):
        read_image(tmp_path / "eight.png", 1, input_bits=12)


def test_a_16_bit_mask_of_class_ids_is_read_and_one_of_levels_above_255_is_refused(tmp_path):
    spec = SampleSpec("own", ("background", "scratch", "dent"), 1)
    cv2.imwrite(str(tmp_path / "ids.png"), np.array([[0, 1], [2, 0]], np.uint16))
    assert read_mask(tmp_path / "ids.png", (2, 2), spec, None).tolist() == [[0, 1], [2, 0]]
    cv2.imwrite(str(tmp_path / "levels.png"), np.array([[0, 65535], [0, 0]], np.uint16))
    with pytest.raises(DataError, match="save masks as 8-bit PNG"):
        read_mask(tmp_path / "levels.png", (2, 2), spec, None)


def test_a_12_bit_set_builds_like_its_8_bit_original_and_its_export_reads_12_bit_images(
    sample_root, sample_dataset, tmp_path, capsys
):
    from conftest import _labelled_set, _labeller_run

    raw = tmp_path / "raw12"
    _write_12_bit_copy(sample_root, raw)
    data = tmp_path / "data12"
    build = ["data", "build", "--source", "folder", "--root", str(raw), "--out", str(data)]
    classes = "background,inclusion,patches,scratches"
    assert main([*build, "--input-bits", "12", "--classes", classes]) == 0
    twelve, eight = Manifest.load(data), Manifest.load(sample_dataset)
    assert twelve.input_bits == 12 and twelve.dataset_id != eight.dataset_id
    assert twelve.pixel_mean == eight.pixel_mean  # (x << 4) >> 4 == x: the same pixels
    for split in ("train", "val"):
        assert _pixels_by_stem(data, split) == _pixels_by_stem(sample_dataset, split)

    run = _labeller_run(data, tmp_path / "labeller")
    export = tmp_path / "export"
    assert main(["seg", "export", str(run), "--out", str(export)]) == 0
    assert json.loads((export / "model.json").read_text())["input_bits"] == 12
    images = str(raw / "images" / "val")
    assert (
        main(["predict", "--model", str(export), "--images", images, "--out", str(tmp_path / "p")])
        == 0
    )
    assert len(list((tmp_path / "p").glob("*_mask.png"))) == 15

    # The same camera's images, labelled by that model: read as 12-bit too.
    labelled = _labelled_set(raw / "images" / "val", run, tmp_path / "labelled")
    assert Manifest.load(labelled).split_total("train") == 15
    assert Manifest.load(labelled).input_bits == 12

    capsys.readouterr()
    eight_bit = str(sample_root / "images" / "val")
    assert (
        main(
            ["predict", "--model", str(export), "--images", eight_bit, "--out", str(tmp_path / "q")]
        )
        == 2
    )
    error = error_lines(capsys.readouterr().err)[-1]  # below the progress bar
    assert error.startswith("defectforge: error: ")
    assert "12-bit images in 16-bit files are expected (--input-bits 12)" in error
    assert not (tmp_path / "q").exists()

"""Tall line-scan images of mixed heights (issue 28): narrower than a tile, more than two tiles
tall, neither side a multiple of 32, heights differing image to image, 0/255 masks beside them.
The export's check, `predict` (a run and an export) and `seg eval` follow one rule for padding,
tiling and blending; `predict` skips and lists bad files on request, as `data build` does."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_checks import error_lines

from defectforge.cli import main
from defectforge.segmentation.tiling import DEFAULT_TILE

# A line scan scaled down in width only: 200 px is still narrower than a tile.
WIDTH, HEIGHTS, COILS = 200, (1061, 1090, 1061, 1147), 4
BUILD = ["--source", "folder", "--mask-threshold", "128", "--group-by", "parent", "--binary"]


def write_line_scans(root: Path) -> Path:
    """One folder per coil, ``scanK.jpg`` beside its 0/255 mask ``scanK.png``; a bright or dark
    stripe in every image."""
    rng = np.random.default_rng(5)
    for coil in range(COILS):
        folder = root / f"coil{coil:02d}"
        folder.mkdir(parents=True)
        for k, height in enumerate(HEIGHTS):
            image = (120 + rng.normal(0, 5, (height, WIDTH))).clip(0, 255).astype(np.uint8)
            mask = np.zeros((height, WIDTH), np.uint8)
            top, left = int(rng.integers(20, height - 80)), int(rng.integers(0, WIDTH - 12))
            mask[top : top + 60, left : left + 10] = 255
            image[mask > 0] = 220 if k % 2 else 30
            cv2.imwrite(str(folder / f"scan{k}.jpg"), image)
            cv2.imwrite(str(folder / f"scan{k}.png"), mask)
    return root


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    return write_line_scans(tmp_path_factory.mktemp("tall") / "line-scans")


@pytest.fixture(scope="module")
def tall_run(scans, ray_session) -> Path:
    data, run = scans.parent / "ds", scans.parent / "run"
    argv = ["data", "build", "--root", str(scans), *BUILD, "--split-ratios", "0.5,0.5,0"]
    assert main([*argv, "--out", str(data)]) == 0
    assert (
        main(
            ["seg", "train", "--data", str(data), "--out", str(run), "--epochs", "1"]
            + ["--crop-size", "64", "--batch-size", "4", "--max-steps-per-epoch", "2"]
        )
        == 0
    )
    return run


@pytest.fixture(scope="module")
def tall_export(tall_run) -> Path:
    export = tall_run.parent / "export"
    assert main(["seg", "export", str(tall_run), "--out", str(export)]) == 0
    return export


def test_windows_of_a_tall_narrow_image_are_padded_and_blended_once():
    from defectforge.segmentation.tiling import Geometry

    seen = []

    def network(images: np.ndarray) -> np.ndarray:
        seen.append(images.shape)
        return np.repeat(images.astype(np.float32).transpose(0, 3, 1, 2), 2, axis=1)

    image = np.random.default_rng(0).integers(0, 255, (2, 1261, 500, 1), np.uint8)
    logits = Geometry(multiple=32, min_side=32).logits(image, network)
    # Three windows down the image, each the full width padded to 512; blending an identity
    # gives the image back wherever windows overlap.
    assert seen == [(2, DEFAULT_TILE, 512, 1)] * 3
    assert logits.shape == (2, 2, 1261, 500)
    assert np.abs(logits[:, 0] - image[..., 0]).max() < 1e-3


def test_tall_images_of_mixed_heights_export_predict_and_evaluate(
    scans, tall_run, tall_export, tmp_path, capsys
):
    from defectforge.segmentation.checkpoint import load_model
    from defectforge.segmentation.export import verification_images

    _, cfg = load_model(tall_run)
    checked = verification_images(cfg)
    height, width = checked.shape[1:3]
    assert width < DEFAULT_TILE < 2 * DEFAULT_TILE < height and height % 32 and width % 32
    check = json.loads((tall_export / "model.json").read_text())["verification"]
    assert check["images"] == len(checked) >= 2
    assert max(check["max_abs_logit_difference"].values()) <= check["tolerance"]

    coil = scans / "coil00"
    found = {}
    for name, model in (("run", tall_run), ("export", tall_export)):
        out = tmp_path / name
        argv = ["predict", "--model", str(model), "--images", str(coil), "--out", str(out)]
        assert main(argv) == 0
        with open(out / "predictions.csv") as handle:
            found[name] = {row["image"]: row for row in csv.DictReader(handle)}
        for k, height in enumerate(HEIGHTS):
            assert cv2.imread(str(out / f"scan{k}_mask.png"), -1).shape == (height, WIDTH)
    assert sorted(found["run"]) == [f"scan{k}" for k in range(len(HEIGHTS))]
    for image, row in found["run"].items():
        exported = float(found["export"][image]["max_defect_probability"])
        assert abs(float(row["max_defect_probability"]) - exported) < 1e-3

    capsys.readouterr()
    argv = ["seg", "eval", "--model", str(tall_run), "--images", str(coil), "--masks", str(coil)]
    assert main([*argv, "--mask-threshold", "128", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["images"] == sum(scored["verdicts"].values()) == len(HEIGHTS)
    assert 0.0 <= scored["binary_defect_iou"] <= 1.0


# --- predict's bad input (issue 28 item 7): data build's --skip-bad and --max-pixels ----------

# scan0 is 200 x 1,061 = 212,200 px, scan1 200 x 1,090 = 218,000 px: a limit between them.
BETWEEN = "215000"


@pytest.fixture
def with_bad(scans, tmp_path) -> Path:
    """Two good scans and, sorted after them, a JPEG cut short."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    for k in (0, 1):
        (folder / f"scan{k}.jpg").write_bytes((scans / "coil01" / f"scan{k}.jpg").read_bytes())
    whole = (scans / "coil01" / "scan2.jpg").read_bytes()
    (folder / "zz-cut.jpg").write_bytes(whole[: len(whole) // 2])
    return folder


def _predict(model: Path, images: Path, out: Path, *flags: str) -> int:
    return main(
        ["predict", "--model", str(model), "--images", str(images), "--out", str(out)] + [*flags]
    )


def _one_line_error(capsys) -> str:
    """The error line (stderr's last; above it only progress bars), with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = error_lines(err)[-1]
    assert line.startswith("defectforge: error: "), err
    return line


def _nothing_left(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def _rows(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_a_bad_image_is_one_line_naming_it_and_the_flag(tall_run, with_bad, tmp_path, capsys):
    out = tmp_path / "pred"
    assert _predict(tall_run, with_bad, out) == 2
    err = _one_line_error(capsys)
    assert "zz-cut.jpg: image cannot be read: JPEG is truncated" in err and "--skip-bad" in err
    assert _nothing_left(out)
    assert _predict(tall_run, with_bad, out, "--max-pixels", BETWEEN) == 2
    err = _one_line_error(capsys)
    assert "scan1.jpg: image header claims 200 x 1090 pixels" in err
    assert "raise --max-pixels" in err and _nothing_left(out)
    assert _predict(tall_run, with_bad, out, "--max-pixels", "0") == 2
    assert "max_pixels = 0: must be >= 1" in _one_line_error(capsys) and _nothing_left(out)
    (with_bad / "scan0.jpg").unlink()
    (with_bad / "scan1.jpg").unlink()
    assert _predict(tall_run, with_bad, out, "--skip-bad") == 2
    assert "no other image could be predicted" in _one_line_error(capsys) and _nothing_left(out)


@pytest.mark.parametrize("kind", ["run", "export"])
def test_skip_bad_writes_every_good_image_and_lists_the_bad(
    kind, tall_run, tall_export, with_bad, tmp_path, capsys
):
    model = tall_run if kind == "run" else tall_export
    out = tmp_path / "pred"
    assert _predict(model, with_bad, out, "--skip-bad", "--max-pixels", BETWEEN) == 0
    assert "1 image: " in capsys.readouterr().out
    assert [row["image"] for row in _rows(out / "predictions.csv")] == ["scan0"]
    assert cv2.imread(str(out / "scan0_mask.png"), -1).shape == (HEIGHTS[0], WIDTH)
    rejected = {row["image"]: row for row in _rows(out / "rejected.csv")}
    assert sorted(rejected) == ["scan1", "zz-cut"]
    assert rejected["zz-cut"]["file"] == str(with_bad / "zz-cut.jpg")
    assert "truncated" in rejected["zz-cut"]["reason"]
    assert "above the limit" in rejected["scan1"]["reason"]
    # At the default limit scan1 is predicted too; the cut file is still listed.
    again = tmp_path / "again"
    assert _predict(model, with_bad, again, "--skip-bad") == 0
    out_line = capsys.readouterr().out
    assert "2 images: " in out_line and "1 skipped as bad, listed in rejected.csv" in out_line
    assert [row["image"] for row in _rows(again / "predictions.csv")] == ["scan0", "scan1"]
    assert cv2.imread(str(again / "scan1_mask.png"), -1).shape == (HEIGHTS[1], WIDTH)

"""Your own images to a deployed inspector (issue 16): a folder in a factory's layout, defect-aware
crops, tiled inference, verdicts with a calibrated operating point, exports of any run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cli_checks import error_lines, refused
from torch import nn

from defectforge.cli import main
from defectforge.core.errors import DataError

PARTS, PER_PART, HEIGHT, WIDTH = 6, 4, 64, 192


def write_parts(root: Path, missing_labels: int = 0) -> Path:
    """A small set in the layout of public inspection sets such as KolektorSDD: one folder per
    physical part, ``PartK.jpg`` beside ``PartK_label.bmp``, masks 0/255, a thin crack in a
    third of the images and none in the rest."""
    rng = np.random.default_rng(7)
    for part in range(PARTS):
        folder = root / f"kos{part:02d}"
        folder.mkdir(parents=True)
        for k in range(PER_PART):
            image = (110 + rng.normal(0, 6, (HEIGHT, WIDTH))).clip(0, 255).astype(np.uint8)
            label = np.zeros((HEIGHT, WIDTH), np.uint8)
            if (part * PER_PART + k) % 3 == 0:
                row = int(rng.integers(10, HEIGHT - 10))
                left = int(rng.integers(0, WIDTH - 60))
                cv2.line(label, (left, row), (left + 50, row + 4), 255, 2)
                image[label > 0] = 40
            cv2.imwrite(str(folder / f"Part{k}.jpg"), image)
            cv2.imwrite(str(folder / f"Part{k}_label.bmp"), label)
    empty = [p for p in sorted(root.rglob("*_label.bmp")) if not cv2.imread(str(p), 0).any()]
    for label in empty[:missing_labels]:  # defect-free images, as a good/ folder holds them
        label.unlink()
    return root


LAYOUT = ["--source", "folder", "--mask-suffix", "_label", "--mask-threshold", "128"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    return write_parts(tmp_path_factory.mktemp("parts") / "kolektor-like")


# --- reading any folder ----------------------------------------------------------------------


@pytest.mark.parametrize("classes", [["--classes", "background,crack"], ["--binary"]])
def test_a_factory_layout_with_0_255_masks_builds(classes, parts, tmp_path, ray_session):
    from defectforge.datasets.manifest import Manifest

    out = tmp_path / "ds"
    assert main(["data", "build", "--root", str(parts), *LAYOUT, *classes, "--out", str(out)]) == 0
    manifest = Manifest.load(out)
    assert sum(c.total for c in manifest.counts.values()) == PARTS * PER_PART
    defect = "crack" if "--classes" in classes else "defect"
    found = sum(c.by_class.get(defect, 0) for c in manifest.counts.values())
    assert found == PARTS * PER_PART // 3  # every cracked image, its class the one defect class


def test_thresholded_masks_of_several_classes_need_the_class_named(parts, tmp_path, capsys):
    from defectforge.datasets.build import BuildConfig, discover
    from defectforge.datasets.readers import load_sample

    cfg = BuildConfig(
        source="folder",
        root=str(parts),
        mask_suffix="_label",
        mask_threshold=128,
        classes=("background", "crack", "dent"),
    )
    refs, spec = discover(cfg)
    cracked = next(r for r in refs if r.id.endswith("kos00/Part0"))
    with pytest.raises(DataError, match=r"\['crack', 'dent'\] are possible.*--class-from-folder"):
        load_sample(cracked, spec)


def test_images_without_a_mask_can_be_read_as_defect_free(tmp_path, capsys, ray_session):
    from defectforge.datasets.manifest import Manifest

    root = write_parts(tmp_path / "raw", missing_labels=3)
    argv = ["data", "build", "--root", str(root), *LAYOUT]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert "no mask found for this image" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "b"), "--missing-mask", "background"]) == 0
    manifest = Manifest.load(tmp_path / "b")
    assert manifest.missing_masks == 3 and manifest.config["missing_mask"] == "background"


def test_a_folder_of_defect_free_images_read_as_a_class_is_pointed_out(
    tmp_path, capsys, ray_session
):
    """magnetic-tile's layout: MT_Crack/ and MT_Free/, the latter's masks all empty."""
    for folder, value in (("MT_Crack", 255), ("MT_Free", 0)):
        (tmp_path / "tiles" / folder).mkdir(parents=True)
        for k in range(3):
            mask = np.zeros((24, 24), np.uint8)
            mask[8:12, 4:20] = value
            cv2.imwrite(
                str(tmp_path / "tiles" / folder / f"t{k}.jpg"), np.full((24, 24), 99, np.uint8)
            )
            cv2.imwrite(str(tmp_path / "tiles" / folder / f"t{k}.png"), mask)
    argv = ["data", "build", "--source", "folder", "--root", str(tmp_path / "tiles")]
    argv += ["--class-from-folder", "--mask-threshold", "128", "--split-ratios", "0.5,0.5,0"]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "ds")]) == 0
    err = capsys.readouterr().err
    assert "classes ['MT_Free'] (from folder names) mark no pixel" in err
    assert "`folders: {MT_Free: background}`" in err


def test_masks_beside_their_images_are_not_taken_for_images(tmp_path):
    """As magnetic-tile lays them out (name.jpg beside its mask name.png), and with a suffix:
    predict and seg eval must see each image once, never its mask."""
    from defectforge.datasets.readers import list_images

    picture = np.zeros((8, 8), np.uint8)
    for name in ("a.jpg", "a.png", "b.png", "c.bmp", "c_label.bmp"):
        cv2.imwrite(str(tmp_path / name), picture)
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png", "c.bmp", "c_label.bmp"]
    (tmp_path / "a.png").unlink()  # with a suffix it would be an image named like a.jpg
    assert [p.name for p in list_images(tmp_path, "_label")] == ["a.jpg", "b.png", "c.bmp"]


def test_group_by_keeps_each_part_in_one_split(parts):
    from defectforge.datasets.discover import discover_folder

    for rule in ("parent", r"(kos\d+)"):
        refs = discover_folder(parts, "k", (0.5, 0.25, 0.25), "_label", group_by=rule)
        by_part: dict[str, set] = {}
        for ref in refs:
            by_part.setdefault(ref.id.split("/")[1], set()).add(ref.split)
        assert all(len(splits) == 1 for splits in by_part.values())
        assert len({split for splits in by_part.values() for split in splits}) > 1


# --- rare, small defects -------------------------------------------------------------------


def test_defect_crops_always_hold_a_defect_and_random_ones_mostly_do_not():
    from defectforge.datasets.batches import random_crop

    image = np.zeros((400, 400, 1), np.uint8)
    mask = np.zeros((400, 400), np.uint8)
    mask[300:303, 50:60] = 1
    rng = np.random.default_rng(0)
    aware = [random_crop(image, mask, 64, rng, 1.0)[1].any() for _ in range(200)]
    plain = [random_crop(image, mask, 64, rng, 0.0)[1].any() for _ in range(200)]
    assert all(aware) and sum(plain) < 40


class PixelWise(nn.Module):
    """A network that sees one pixel at a time: tiling cannot change its output."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(1, 3, 1)

    def forward(self, x):
        return self.head(torch.tanh(x))


def test_tiled_logits_equal_whole_image_logits():
    from defectforge.datasets.batches import BatchSpec, normalise, pad_to
    from defectforge.segmentation.inference import network_of, predict_logits
    from defectforge.segmentation.tiling import Geometry, tile_starts

    torch.manual_seed(0)
    model, spec = PixelWise().eval(), BatchSpec(1, (0.5,), (0.2,))
    network = network_of(model, spec)
    image = np.random.default_rng(1).integers(0, 255, (500, 1260, 1), np.uint8)
    whole = Geometry(multiple=32, tile=2048).logits(image[None], network)[0]
    tiled = Geometry(multiple=32, tile=256, overlap=48).logits(image[None], network)[0]
    assert tiled.shape == (3, 500, 1260) and np.abs(tiled - whole).max() < 1e-5
    assert np.abs(predict_logits(model, spec, image).numpy() - whole).max() < 1e-5
    # An image within the tile is one window, padded as training pads it.
    small = image[:200, :300]
    padded = torch.from_numpy(normalise(pad_to(small, None, 224, 320)[0][None], spec))
    with torch.no_grad():
        direct = model(padded)[0, :, :200, :300].numpy()
    assert np.array_equal(predict_logits(model, spec, small).numpy(), direct)
    assert tile_starts(1260, 256, 48)[-1] == 1260 - 256 and tile_starts(100, 256, 48) == [0]


# --- decisions -------------------------------------------------------------------------------


def test_findings_and_calibration_pick_the_expected_operating_point():
    from defectforge.segmentation.decisions import OperatingPoint, calibrate, findings

    probabilities = np.zeros((2, 20, 20), np.float32)
    probabilities[0] = 1.0
    probabilities[:, 2:5, 2:6] = [[[0.1]], [[0.9]]]  # a 12-pixel region at 0.9
    row = findings(probabilities, ("background", "crack"), OperatingPoint(0.5, 10))
    assert row == {
        "verdict": "NG",
        "max_defect_probability": 0.9,
        "largest_region_px": 12,
        "crack_px": 12,
    }
    assert (
        findings(probabilities, ("background", "crack"), OperatingPoint(0.5, 13))["verdict"] == "OK"
    )
    # Defective images show a 40-pixel region; defect-free ones a 6-pixel speck of noise.
    largest = [[40] * 19] * 4 + [[6] * 19] * 4
    defective = [True] * 4 + [False] * 4
    point = calibrate(largest, defective, target_recall=1.0)
    assert point["recall"] == 1.0 and point["false_alarm_rate"] == 0.0 and point["met"]
    assert 6 < point["operating_point"]["min_area"] <= 40
    strict = calibrate(largest, defective, target_false_alarm=0.0)
    assert strict["false_alarm_rate"] == 0.0 and strict["recall"] == 1.0


# --- the whole walk, as the README shows it --------------------------------------------------


def test_from_a_factory_folder_to_verdicts(parts, tmp_path, capsys, ray_session):
    data, run, export = tmp_path / "ds", tmp_path / "run", tmp_path / "export"
    assert (
        main(
            ["data", "build", "--root", str(parts), *LAYOUT, "--binary", "--group-by", "parent"]
            + ["--split-ratios", "0.5,0.5,0", "--out", str(data)]
        )
        == 0
    )
    assert (
        main(
            ["seg", "train", "--data", str(data), "--out", str(run), "--epochs", "2"]
            + ["--crop-size", "64", "--batch-size", "4", "--defect-crop-prob", "0.5"]
            + ["--defect-oversample", "2", "--max-steps-per-epoch", "4"]
        )
        == 0
    )
    assert json.loads((run / "config.json").read_text())["defect_crop_prob"] == 0.5
    capsys.readouterr()
    assert main(["seg", "calibrate", str(run), "--target-recall", "0.9"]) == 0
    assert "operating point: defect probability >=" in capsys.readouterr().out
    assert (run / "plots" / "operating_point.png").stat().st_size > 5000
    stored = json.loads((run / "operating_point.json").read_text())["operating_point"]

    folder = parts / "kos00"
    assert (
        main(
            ["seg", "eval", "--model", str(run), "--images", str(folder), "--masks", str(folder)]
            + ["--mask-suffix", "_label", "--mask-threshold", "128", "--json"]
        )
        == 0
    )
    scored = json.loads(capsys.readouterr().out)
    assert scored["images"] == PER_PART and scored["operating_point"] == stored
    assert set(scored["verdicts"]) == {"true_ng", "false_ng", "true_ok", "missed_ng"}

    assert main(["seg", "export", str(run), "--out", str(export)]) == 0
    meta = json.loads((export / "model.json").read_text())
    assert meta["operating_point"] == stored and meta["input"]["multiple"] == 32
    assert (
        main(
            ["predict", "--model", str(export), "--images", str(folder)]
            + ["--mask-suffix", "_label", "--out", str(tmp_path / "pred")]
        )
        == 0
    )
    with open(tmp_path / "pred" / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == [f"Part{k}" for k in range(PER_PART)]
    assert {r["verdict"] for r in rows} <= {"OK", "NG"}
    assert set(rows[0]) == {
        "image",
        "verdict",
        "max_defect_probability",
        "largest_region_px",
        "defect_px",
    }
    assert len(list((tmp_path / "pred").glob("*_mask.png"))) == PER_PART


@pytest.fixture(scope="module")
def labeller_export(labeller, tmp_path_factory) -> Path:
    from defectforge.segmentation.export import export_trained_run

    out = tmp_path_factory.mktemp("labeller-export") / "export"
    export_trained_run(labeller, out)
    return out


@pytest.mark.floors
def test_an_export_predicts_any_size_and_loads_in_smp(labeller, labeller_export):
    import segmentation_models_pytorch as smp

    from defectforge.segmentation.checkpoint import load_model
    from defectforge.segmentation.exported import ExportedModel
    from defectforge.segmentation.inference import image_probabilities

    model, cfg = load_model(labeller)
    large = np.random.default_rng(3).integers(0, 255, (600, 700, 1), np.uint8)
    reference = image_probabilities(model, cfg.batch_spec(), large)
    for runtime in ("onnx", "torchscript"):
        exported = ExportedModel(labeller_export, runtime).probabilities(large)
        assert exported.shape == reference.shape and np.abs(exported - reference).max() < 1e-3
    network = smp.from_pretrained(str(labeller_export / "smp")).eval()
    x = torch.rand(1, 1, 64, 64)
    assert torch.allclose(network(x), model(x), atol=1e-5)
    if not torch.cuda.is_available():  # said as it is, not as a damaged file
        with pytest.raises(DataError, match="PyTorch here sees no CUDA GPU.*--device cpu"):
            ExportedModel(labeller_export, "torchscript", "cuda")


def test_predict_takes_one_image_or_a_model_file_and_says_what_subfolders_it_leaves(
    labeller, tmp_path, capsys
):
    folder = tmp_path / "new-parts"
    (folder / "line2").mkdir(parents=True)
    for path in (folder / "a.png", folder / "b.PNG", folder / "line2" / "c.png"):
        cv2.imwrite(str(path), np.full((40, 56), 120, np.uint8))
    model_file = str(labeller / "model.pt")
    one = ["predict", "--model", model_file, "--images", str(folder / "a.png")]
    assert main([*one, "--out", str(tmp_path / "one")]) == 0
    assert len((tmp_path / "one" / "predictions.csv").read_text().splitlines()) == 2
    capsys.readouterr()
    whole = ["predict", "--model", str(labeller), "--images", str(folder)]
    assert main([*whole, "--out", str(tmp_path / "all")]) == 0
    assert "1 images in its subfolders are not read" in capsys.readouterr().err
    assert len((tmp_path / "all" / "predictions.csv").read_text().splitlines()) == 3


def test_what_predict_and_eval_would_leave_out_or_ignore_is_said(labeller, tmp_path, capsys):
    """Found probing them as a new user: each was silent, or advised a fix that fails."""
    grey = np.full((40, 56), 120, np.uint8)
    folder = tmp_path / "shots"
    folder.mkdir()
    for name in ("a.png", "a.jpg", "b.png"):  # a.png is taken for the mask of a.jpg
        cv2.imwrite(str(folder / name), grey)
    run = ["predict", "--model", str(labeller), "--images", str(folder)]
    capsys.readouterr()
    assert main([*run, "--out", str(tmp_path / "p")]) == 0
    assert "1 files are taken for the masks of images beside them" in capsys.readouterr().err
    refused(
        capsys,
        [*run, "--out", str(tmp_path / "q"), "--device", "cuda"],
        "--device cuda choose how an export runs, and this is a run folder",
        "seg export",
    )
    (tmp_path / "deeper" / "line1").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "deeper" / "line1" / "c.png"), grey)
    only_below = ["predict", "--model", str(labeller), "--images", str(tmp_path / "deeper")]
    refused(capsys, [*only_below, "--out", str(tmp_path / "r")], "1 lie in its subfolders")

    evaluate = ["seg", "eval", "--images", str(folder), "--masks", str(tmp_path / "masks")]
    refused(
        capsys,
        ["seg", "eval", "--model", str(tmp_path / "nowhere"), "--images", str(folder)],
        "nowhere: does not exist",
    )
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.json").write_text("{}")
    refused(capsys, [*evaluate, "--model", str(tmp_path / "export")], "is an export (model.json)")

    (tmp_path / "masks").mkdir()
    for stem in ("a", "b"):  # 0/255 masks against a model of three defect classes
        mask = np.zeros((40, 56), np.uint8)
        mask[10:20, 5:50] = 255
        cv2.imwrite(str(tmp_path / "masks" / f"{stem}.png"), mask)
    scored = [*evaluate, "--model", str(labeller), "--mask-threshold", "128", "--binary"]
    assert main([*scored, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 2
    (folder / "b.png").write_bytes(b"")
    assert main(scored) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert "b.png: image cannot be read: file is empty" in last
    assert "--skip-bad" not in last  # seg eval has no such flag


def test_a_split_the_runs_dataset_lacks_is_one_line(labeller, capsys):
    # The sample is built without a test split.
    assert main(["seg", "eval", "--model", str(labeller), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "has no test split (it was built without one)" in err
    split = ["seg", "eval", "--model", str(labeller), "--split", "val"]
    assert main([*split, "--masks", "/elsewhere", "--mask-suffix", "_m"]) == 2
    err = capsys.readouterr().err
    assert "--split val with --masks, --mask-suffix: a split's masks come from the dataset" in err


def test_a_false_alarm_budget_without_defect_free_val_images_is_refused(labeller, tmp_path, capsys):
    import shutil

    # Every image of the NEU sample holds a defect: its false-alarm rate would be 0/0.
    assert main(["seg", "calibrate", str(labeller), "--target-false-alarm", "0.1"]) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "is defect-free, so a false-alarm rate cannot" in err
    assert not (labeller / "operating_point.json").exists()
    # A recall target works, and the rate it cannot measure is not printed as 0.000.
    run = shutil.copytree(labeller, tmp_path / "run")
    assert main(["seg", "calibrate", str(run), "--target-recall", "0.9"]) == 0
    assert "false-alarm rate n/a (no defect-free val image)" in capsys.readouterr().out


def test_the_same_images_split_otherwise_are_another_dataset(
    sample_dataset, sample_with_test, labeller, labelled, generated, tmp_path, capsys
):
    from dataclasses import replace

    from defectforge.datasets.manifest import Manifest
    from defectforge.datasets.mix import check_compatible
    from defectforge.segmentation.checkpoint import load_model, save_model

    resplit = sample_with_test  # the sample's images, a test split carved from its train split
    assert Manifest.load(resplit).dataset_id != Manifest.load(sample_dataset).dataset_id
    # The labelled set's makers learnt from train images that are test images here.
    with pytest.raises(DataError, match=r"learnt from \d+ image\(s\) that are in .*test split"):
        check_compatible(resplit, labelled)
    # A run whose dataset folder was rebuilt with other splits since it trained.
    model, cfg = load_model(labeller)
    moved = save_model(tmp_path / "run", model, replace(cfg, data=str(resplit)))
    assert main(["seg", "eval", "--model", str(moved), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "was rebuilt since the run trained on it" in err
    # Images labelled by such a run: which images it learnt from is no longer known.
    labelling = ["synth", "label", "--images", str(generated), "--labeller", str(moved)]
    assert main([*labelling, "--out", str(tmp_path / "labelled")]) == 2
    assert "rebuilt since the labeller learnt from it" in capsys.readouterr().err
    assert not (tmp_path / "labelled").exists()


def test_an_export_runs_only_with_its_own_files_and_the_file_named_is_the_file_run(
    labeller_export, sample_dataset, tmp_path, capsys
):
    """Found probing: a model file copied in from another export ran with this one's classes
    (a binary model's defects reported as inclusions); `--model EXPORT/model.torchscript.pt`
    ran the ONNX file; an export without model.json was "a run folder missing config.json"."""
    import shutil

    from defectforge.segmentation.checkpoint import save_model
    from defectforge.segmentation.export import export_trained_run
    from defectforge.segmentation.models import build_model
    from defectforge.trainables.seg import config_from_manifest

    four, two = tmp_path / "four-classes", tmp_path / "binary"
    shutil.copytree(labeller_export, four)
    binary_cfg = config_from_manifest(sample_dataset, binary=True, epochs=1)
    binary = build_model(binary_cfg.arch, binary_cfg.encoder, binary_cfg.channels, 2)
    export_trained_run(save_model(tmp_path / "binary-run", binary, binary_cfg), two)
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.full((40, 56), 120, np.uint8))

    def predict(model, *flags):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        return ["predict", "--model", str(model), "--images", str(images), "--out", str(out)] + [
            *flags
        ]

    swapped = tmp_path / "swapped"
    shutil.copytree(four, swapped)
    shutil.copy(two / "model.onnx", swapped / "model.onnx")
    refused(capsys, predict(swapped), f"{swapped / 'model.onnx'}: is not the file this export")
    meta = json.loads((swapped / "model.json").read_text())
    del meta["sha256"]  # as exports made before model.json recorded it
    (swapped / "model.json").write_text(json.dumps(meta))
    refused(
        capsys,
        predict(swapped),
        "gives 2 output channels, but model.json names 4 classes",
    )

    (four / "model.onnx").unlink()
    refused(capsys, predict(four), "missing from this export; pass --runtime torchscript")
    assert main(predict(four / "model.torchscript.pt")) == 0  # the file named runs
    refused(capsys, predict(four / "model.torchscript.pt", "--runtime", "onnx"), "leave out")
    (four / "model.json").unlink()
    refused(capsys, predict(four), "model.json: missing: this folder holds an export's")
    refused(capsys, predict(tmp_path / "nope"), "nothing is there")

"""What `predict` writes, independent of any model: a probability function stands in for the
network (it is a parameter of the writer), so each picture can be checked against a known
probability map."""

import csv
import sys

import cv2
import numpy as np
import pytest

from defectforge.core.errors import DataError
from defectforge.segmentation.decisions import OperatingPoint
from defectforge.segmentation.predictions import IN_FLIGHT, write_predictions

pytestmark = pytest.mark.floors  # .ci/floors runs them at the lowest versions

CLASSES = ("background", "defect")


def brightness_is_defect(image: np.ndarray, _source: str) -> np.ndarray:
    """Two-class probabilities whose defect probability is the pixel's brightness / 255."""
    defect = image[:, :, 0].astype(np.float64) / 255.0
    return np.stack([1.0 - defect, defect])


def gradient(width: int, offset: int = 0) -> np.ndarray:
    row = (np.arange(width) * 255 // (width - 1)).astype(np.uint8)
    return np.roll(np.tile(row, (16, 1)), offset, axis=1)[:, :, None]


def samples_of(images: list[np.ndarray], bad: set[int] = frozenset()):
    def read(index):
        if index in bad:
            raise DataError(f"img{index}.png", "cannot be decoded", "replace the file")
        return images[index]

    return [(f"img{i}", f"img{i}.png", lambda i=i: read(i)) for i in range(len(images))]


def inferno(levels: np.ndarray) -> np.ndarray:
    """OpenCV's inferno colours of uint8 levels, RGB."""
    return cv2.applyColorMap(levels, cv2.COLORMAP_INFERNO)[:, :, ::-1]


def test_heatmaps_show_the_defect_probability_of_every_pixel_beside_mask_and_overlay(tmp_path):
    images = [gradient(32, offset) for offset in range(3 * IN_FLIGHT)]
    rows = write_predictions(
        samples_of(images), brightness_is_defect, CLASSES, OperatingPoint(), tmp_path / "out",
        heatmaps=True,
    )  # fmt: skip

    assert [row["image"] for row in rows] == [f"img{i}" for i in range(len(images))]
    for index, image in enumerate(images):
        picture = cv2.imread(str(tmp_path / "out" / f"img{index}_heatmap.png"))[:, :, ::-1]
        assert np.array_equal(picture, inferno(image[:, :, 0]))
        mask = cv2.imread(str(tmp_path / "out" / f"img{index}_mask.png"), -1)
        assert np.array_equal(mask, (image[:, :, 0] > 127).astype(np.uint8))
        assert (tmp_path / "out" / f"img{index}_overlay.png").is_file()
    with open(tmp_path / "out" / "predictions.csv") as handle:
        listed = list(csv.DictReader(handle))
    assert [float(row["max_defect_probability"]) for row in listed] == [1.0] * len(images)


def test_without_heatmaps_none_is_written(tmp_path):
    write_predictions(
        samples_of([gradient(8)]), brightness_is_defect, CLASSES, OperatingPoint(), tmp_path / "o"
    )
    assert not list((tmp_path / "o").glob("*_heatmap.png"))
    assert (tmp_path / "o" / "img0_mask.png").is_file()


def test_a_bad_image_read_ahead_stops_it_or_is_listed_in_order(tmp_path):
    images = [gradient(8, k) for k in range(2 * IN_FLIGHT)]
    bad = {1, IN_FLIGHT + 2}
    with pytest.raises(DataError, match="img1.png"):
        write_predictions(
            samples_of(images, bad), brightness_is_defect, CLASSES, OperatingPoint(),
            tmp_path / "stopped",
        )  # fmt: skip
    assert not (tmp_path / "stopped").exists()

    rows = write_predictions(
        samples_of(images, bad), brightness_is_defect, CLASSES, OperatingPoint(),
        tmp_path / "skipped", skip_bad=True,
    )  # fmt: skip
    kept = [f"img{i}" for i in range(len(images)) if i not in bad]
    assert [row["image"] for row in rows] == kept
    with open(tmp_path / "skipped" / "rejected.csv") as handle:
        assert [row["image"] for row in csv.DictReader(handle)] == ["img1", f"img{IN_FLIGHT + 2}"]
    assert sorted(p.name for p in (tmp_path / "skipped").glob("*_mask.png")) == sorted(
        f"{name}_mask.png" for name in kept
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own niceness: Linux")
def test_the_io_thread_yields_to_the_runtime_but_never_raises_its_priority():
    import os
    import threading

    from defectforge.segmentation.predictions import IO_NICENESS, _yield_to_runtime

    def niceness_after(start: int) -> int:
        found = []

        def run():
            thread = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, thread, start)
            _yield_to_runtime()
            found.append(os.getpriority(os.PRIO_PROCESS, thread))

        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
        return found[0]

    own = os.getpriority(os.PRIO_PROCESS, 0)  # lowering a priority needs no privilege
    assert niceness_after(own) == max(own, IO_NICENESS)
    nicer = min(max(own, IO_NICENESS) + 5, 19)
    assert niceness_after(nicer) == nicer  # a thread already nicer stays as it was


def test_the_mask_overlay_and_pixel_counts_show_what_the_verdict_counted(tmp_path):
    """Found probing: masks were each pixel's most probable class whatever the operating point,
    so an OK image could show a mask full of defects, and --threshold changed no picture."""
    classes = ("background", "scratch", "hole")

    def probabilities(image: np.ndarray, _source: str) -> np.ndarray:
        # A pixel's brightness / 255 is its defect probability, split 3:1 scratch : hole on
        # the left half and 1:3 on the right half.
        defect = image[:, :, 0].astype(np.float64) / 255.0
        scratch_share = np.where(np.arange(image.shape[1]) < image.shape[1] // 2, 0.75, 0.25)
        return np.stack([1.0 - defect, defect * scratch_share, defect * (1 - scratch_share)])

    dim = np.zeros((16, 16, 1), np.uint8)
    dim[2:10, 2:12] = 100  # defect probability 0.39: background stays the most probable class
    speck = np.zeros((16, 16, 1), np.uint8)
    speck[5:7, 5:7] = 250  # 4 pixels, sure, but below min_area
    point = OperatingPoint(threshold=0.3, min_area=5)
    rows = write_predictions(
        samples_of([dim, speck]), probabilities, classes, point, tmp_path / "out"
    )
    masks = [cv2.imread(str(tmp_path / "out" / f"img{i}_mask.png"), -1) for i in range(2)]

    assert rows[0]["verdict"] == "NG" and rows[1]["verdict"] == "OK"
    expected = np.zeros((16, 16), np.uint8)
    expected[2:10, 2:8], expected[2:10, 8:12] = 1, 2  # scratch on the left, hole on the right
    assert np.array_equal(masks[0], expected)
    assert (rows[0]["scratch_px"], rows[0]["hole_px"]) == (48, 32)
    assert not masks[1].any() and rows[1]["scratch_px"] == rows[1]["hole_px"] == 0
    # A stricter threshold is drawn too: the dim region no longer counts.
    strict = write_predictions(
        samples_of([dim]), probabilities, classes, OperatingPoint(0.5, 5), tmp_path / "strict"
    )
    assert strict[0]["verdict"] == "OK"
    assert not cv2.imread(str(tmp_path / "strict" / "img0_mask.png"), -1).any()

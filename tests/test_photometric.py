"""Photometric stereo, the three steel maps, the simulated steel set and its build."""

import json

import cv2
import numpy as np
import pytest

from defectforge.core.errors import DataError
from defectforge.datasets.photometric import (
    check_lights,
    light_from_angles,
    normals_from_height,
    photometric_stereo,
    read_lights,
    steel_maps,
)
from defectforge.datasets.steel import SteelOptions, read_steel_image, write_simulation
from defectforge.datasets.steel_sim import STEEL_CLASSES, SimulationConfig

SIZE = 96


def _surface() -> tuple[np.ndarray, np.ndarray]:
    """A wavy sheet with a bump, and an albedo with a step: (height, albedo)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    height = 2 * np.sin(x / 7) * np.cos(y / 11) + 12 * np.exp(
        -((x - 48) ** 2 + (y - 48) ** 2) / 200
    )
    return height, 0.5 + 0.3 * (x > SIZE / 2)


def _lights(k: int = 6, elevation: float = 50) -> np.ndarray:
    return np.array([light_from_angles(a, elevation) for a in np.arange(k) * 360 / k])


def _lambertian(normals, albedo, lights):
    shading = np.einsum("hwc,kc->khw", normals, lights)
    assert shading.min() > 0, "the test surface must be lit by every light (no shadows)"
    return shading * albedo


def _angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1, 1)))


def test_noise_free_lambertian_normals_and_albedo_are_recovered():
    height, albedo = _surface()
    truth = normals_from_height(height)
    lights = _lights()
    normals, recovered = photometric_stereo(_lambertian(truth, albedo, lights), lights)
    # Measured: largest error 1.5e-6 degrees and 7e-16 relative albedo (exact up to rounding).
    assert _angles_deg(normals, truth).max() < 1.0
    assert np.abs(recovered / albedo - 1).max() < 0.01


def test_dropping_the_extremes_survives_specular_highlights():
    height, albedo = _surface()
    truth = normals_from_height(height)
    lights = _lights()
    halfway = lights + [0, 0, 1]
    halfway /= np.linalg.norm(halfway, axis=1, keepdims=True)
    highlights = 0.8 * np.clip(np.einsum("hwc,kc->khw", truth, halfway), 0, 1) ** 40
    captures = _lambertian(truth, albedo, lights) + highlights
    plain, _ = photometric_stereo(captures, lights)
    robust, _ = photometric_stereo(captures, lights, robust=True)
    plain_error = _angles_deg(plain, truth).mean()
    robust_error = _angles_deg(robust, truth).mean()
    assert robust_error < 0.85 * plain_error, (plain_error, robust_error)


def test_curvature_sees_a_dent_and_texture_sees_an_albedo_patch():
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    dent = -4 * np.exp(-((x - 30) ** 2 + (y - 48) ** 2) / 50)
    patch = (np.abs(x - 70) < 8) & (np.abs(y - 48) < 8)
    albedo = np.where(patch, 0.3, 0.7)
    maps = steel_maps(normals_from_height(dent), albedo)
    curvature, texture = np.abs(maps[..., 0]), maps[..., 2]
    background = curvature[5:15, 5:15].mean()
    assert curvature[43:53, 25:35].mean() > 20 * max(background, 1e-6)
    assert curvature[patch].mean() < 0.05 * curvature[43:53, 25:35].mean()
    assert abs(texture[43:53, 25:35].mean() - 0.7) < 1e-9  # relief leaves albedo alone
    assert abs(texture[patch].mean() - 0.3) < 1e-9


def test_bad_lights_are_refused_with_the_reason(tmp_path):
    with pytest.raises(DataError, match="2 light"):
        check_lights(_lights()[:2], "rig")
    coplanar = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [-1, 0, 0.0]])
    with pytest.raises(DataError, match="coplanar"):
        check_lights(coplanar, "rig")
    bad = tmp_path / "lights.json"
    bad.write_text('{"lights": [{"azimuth": 0}]}')
    with pytest.raises(DataError, match=r"lights.json: not a lights file .*KeyError"):
        read_lights(bad)
    bad.write_text(json.dumps({"lights": [{"azimuth": a, "elevation": 40} for a in (0, 120, 240)]}))
    assert np.allclose(np.linalg.norm(read_lights(bad), axis=1), 1)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("steel") / "sim"
    summary = write_simulation(SimulationConfig(n=24, size=64, seed=3), out)
    return out, summary


def test_simulation_writes_captures_lights_and_exact_masks(simulated):
    out, summary = simulated
    sheets = sorted(out.glob("sheet*"))
    assert len(sheets) == 24 and summary["simulated"] is True
    assert len(json.loads((out / "lights.json").read_text())["lights"]) == 6
    mask = cv2.imread(str(sheets[0] / "mask.png"), cv2.IMREAD_UNCHANGED)
    binary = cv2.imread(str(sheets[0] / "mask_binary.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (64, 64) and mask.max() < len(STEEL_CLASSES)
    assert np.array_equal(binary, (mask > 0).astype(np.uint8))
    drawn = summary["defects_drawn"]
    assert drawn["patch"] + drawn["rust"] > drawn["dent"] + drawn["roll_print"]
    capture = cv2.imread(str(sheets[0] / "capture_00.png"), cv2.IMREAD_UNCHANGED)
    assert capture.dtype == np.uint16 and capture.shape == (64, 64)


def test_a_sample_reads_the_same_from_captures_or_from_its_maps(simulated, tmp_path):
    out, _ = simulated
    sheet = out / "sheet00001"
    from_captures = read_steel_image(sheet, out, SteelOptions())
    assert from_captures.shape == (64, 64, 3) and from_captures.dtype == np.uint8
    maps = tmp_path / "maps" / "s1"
    maps.mkdir(parents=True)
    for channel, name in enumerate(("curvature", "range", "texture")):
        cv2.imwrite(str(maps / f"{name}.png"), from_captures[..., channel])
    assert np.array_equal(read_steel_image(maps, maps.parent, SteelOptions()), from_captures)
    cv2.imwrite(str(maps / "texture.png"), np.zeros((32, 64), np.uint8))
    with pytest.raises(DataError, match="differ in size .*texture.png 64x32"):
        read_steel_image(maps, maps.parent, SteelOptions())
    (sheet / "capture_05.png").rename(tmp_path / "moved.png")
    try:
        with pytest.raises(DataError, match="5 capture images but .*lights.json lists 6 lights"):
            read_steel_image(sheet, out, SteelOptions())
    finally:
        (tmp_path / "moved.png").rename(sheet / "capture_05.png")


def test_steel_builds_into_a_three_channel_parquet_dataset(simulated, ray_session, tmp_path):
    from defectforge.datasets.build import BuildConfig
    from defectforge.trainables.data_jobs import build_parquet

    out, _ = simulated
    cfg = BuildConfig(source="steel", root=str(out), steel=SteelOptions(robust=True))
    manifest = build_parquet(cfg, tmp_path / "ds")
    assert manifest.channels == 3 and manifest.classes == STEEL_CLASSES
    assert sum(c.total for c in manifest.counts.values()) == 24
    assert manifest.config["steel"]["robust"] is True
    assert manifest.simulated is True


def test_an_export_of_a_steel_model_predicts_from_raw_captures(simulated, ray_session, tmp_path):
    from defectforge.datasets.build import BuildConfig
    from defectforge.datasets.contract import decode_png
    from defectforge.segmentation.export import export_model, input_conversion, verification_images
    from defectforge.segmentation.exported import predict_folder_exported
    from defectforge.segmentation.models import build_model
    from defectforge.segmentation.overlay import overlay
    from defectforge.trainables.data_jobs import build_parquet, read_split
    from defectforge.trainables.seg import config_from_manifest

    out, _ = simulated
    data = tmp_path / "ds"
    options = SteelOptions(robust=True, clip_percentiles=(2.0, 98.0))
    build_parquet(BuildConfig(source="steel", root=str(out), steel=options), data)
    conversion = input_conversion(str(data))
    assert conversion["steel"]["robust"] is True
    assert conversion["steel"]["clip_percentiles"] == [2.0, 98.0]
    cfg = config_from_manifest(data, crop_size=64)
    model = build_model(cfg.arch, cfg.encoder, cfg.channels, cfg.num_classes)
    export_model(model, cfg, verification_images(cfg), tmp_path / "export", conversion)

    written = len(predict_folder_exported(tmp_path / "export", out, tmp_path / "predicted"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no steel samples .* point --images at"):
        predict_folder_exported(tmp_path / "export", tmp_path / "empty", tmp_path / "none")

    assert written == 24
    row = read_split(data, "train").take(1)[0]
    mask = cv2.imread(str(tmp_path / "predicted" / f"{row['id']}_mask.png"), cv2.IMREAD_UNCHANGED)
    drawn = cv2.imread(str(tmp_path / "predicted" / f"{row['id']}_overlay.png"))
    # The overlay is drawn on the image predict built from the captures: the training image.
    expected = overlay(decode_png(row["image"], 3), mask)
    assert np.array_equal(cv2.cvtColor(drawn, cv2.COLOR_BGR2RGB), expected)


def test_the_steel_quickstart_runs_on_rig_output(simulated, ray_session, tmp_path):
    from defectforge.trainables.quickstart import quickstart

    out, _ = simulated
    metrics = quickstart(str(out), tmp_path / "qs", epochs=1, source="steel")

    assert 0.0 <= metrics["binary_defect_iou"] <= 1.0
    assert set(metrics["per_class_iou"]) == set(STEEL_CLASSES)
    assert json.loads((tmp_path / "qs" / "run" / "eval.json").read_text()) == metrics
    assert (tmp_path / "qs" / "run" / "plots" / "validation_grid.png").stat().st_size > 5000
    manifest = json.loads((tmp_path / "qs" / "dataset" / "manifest.json").read_text())
    assert manifest["config"]["steel"]["robust"] is True and manifest["simulated"] is True

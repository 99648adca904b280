"""Simulated galvanized steel seen by a photometric-stereo rig: a stand-in with known truth.

A sheet is a height field (pixels) and an albedo and gloss field. The background is a galvanized
spangle (Voronoi grains of slightly different albedo and gloss) with rolling marks and a gentle
waviness; defects from the paper's list are drawn into those fields with pixel-exact masks. Each
sheet is rendered under K lights (Lambertian + Blinn-Phong highlights + sensor noise). Pure numpy
and OpenCV; writing files is the caller's business.

Never present this as real data: it exists for tests, the quickstart and the steel study.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from defectforge.core.config import SEED, TypedConfig, option
from defectforge.datasets.photometric import light_from_angles, normals_from_height

STEEL_CLASSES = ("background", "scratch", "dent", "inclusion", "patch", "rust", "roll_print")
# The paper notes colour defects (patches, rust) outnumber dimensional ones on its line.
DEFAULT_DEFECT_WEIGHTS = {
    "patch": 0.30,
    "rust": 0.25,
    "scratch": 0.15,
    "inclusion": 0.12,
    "dent": 0.10,
    "roll_print": 0.08,
}


def _weights_ok(weights: dict[str, float]) -> bool:
    unknown = set(weights) - set(STEEL_CLASSES[1:])
    return not unknown and any(v > 0 for v in weights.values())


@dataclass(frozen=True)
class SimulationConfig(TypedConfig):
    kind = "simulation config"

    n: int = option(300, "sheets to render", lambda v: v >= 1, ">= 1")
    size: int = option(256, "sheet side in px", lambda v: v >= 32, ">= 32")
    lights: int = option(
        6, "lights (captures per sheet)", lambda v: v >= 3, ">= 3 (photometric stereo)"
    )
    light_elevation: float = option(45.0, cli=False)
    seed: int = option(0, "seed of the whole simulation", *SEED)
    max_defects: int = option(
        3, "defects per sheet, 0..max drawn uniformly", lambda v: v >= 0, ">= 0"
    )
    defect_weights: dict[str, float] = option(
        DEFAULT_DEFECT_WEIGHTS,
        cli=False,
        check=_weights_ok,
        valid=f"positive weights for some of {STEEL_CLASSES[1:]}",
    )
    specular: float = option(0.25, cli=False)  # Blinn-Phong weight at full gloss
    shininess: float = option(30.0, cli=False)
    noise: float = option(0.01, cli=False)  # sensor noise, standard deviation on a 0-1 scale

    def light_directions(self) -> np.ndarray:
        azimuths = np.arange(self.lights) * 360.0 / self.lights
        return np.array([light_from_angles(a, self.light_elevation) for a in azimuths])


@dataclass
class Sheet:
    height: np.ndarray  # pixels
    albedo: np.ndarray  # 0-1
    gloss: np.ndarray  # 0-1, scales the specular term
    mask: np.ndarray  # class ids in STEEL_CLASSES
    defects: list[str]


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    noise = cv2.GaussianBlur(rng.standard_normal((size, size)), (0, 0), sigma)
    return noise / (noise.std() + 1e-12)


def _background(rng: np.random.Generator, size: int) -> Sheet:
    grains = max(8, (size // 24) ** 2)
    centres = rng.uniform(0, size, (grains, 2))
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    distance = (x[..., None] - centres[:, 0]) ** 2 + (y[..., None] - centres[:, 1]) ** 2
    grain = distance.argmin(axis=-1)
    albedo = rng.uniform(0.55, 0.75, grains)[grain] + 0.01 * rng.standard_normal((size, size))
    gloss = rng.uniform(0.4, 0.9, grains)[grain]
    rolling = sum(
        rng.uniform(0.005, 0.015)
        * np.sin(2 * np.pi * y / rng.uniform(10, 30) + rng.uniform(0, 6.3))
        for _ in range(3)
    )
    waviness = 1.5 * _smooth_noise(rng, size, size / 6)
    return Sheet(rolling + waviness, albedo, gloss, np.zeros((size, size), np.uint8), defects=[])


def _blob(rng: np.random.Generator, size: int, radius: float) -> np.ndarray:
    """An irregular blob: an ellipse whose edge is roughened by smooth noise. Sizes in this
    module are for 256-px sheets and scale with ``size``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    cx, cy = rng.uniform(radius, size - radius, 2)
    a, b = radius * rng.uniform(0.6, 1.4, 2)
    angle = rng.uniform(0, np.pi)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    ellipse = (u / a) ** 2 + (v / b) ** 2
    return ellipse + 0.35 * _smooth_noise(rng, size, radius / 3) < 1


def _scratch(rng, sheet: Sheet, size: int) -> np.ndarray:
    line = np.zeros((size, size), np.uint8)
    start = rng.uniform(0.1 * size, 0.9 * size, 2)
    direction = rng.uniform(0, 2 * np.pi)
    length, bend = rng.uniform(0.2, 0.6) * size, rng.uniform(-0.3, 0.3)
    points = [
        start + t * length * np.array([np.cos(direction + bend * t), np.sin(direction + bend * t)])
        for t in np.linspace(0, 1, 12)
    ]
    cv2.polylines(line, [np.round(points).astype(np.int32)], False, 1, 1)
    distance = cv2.distanceTransform(1 - line, cv2.DIST_L2, 5)
    width, depth = rng.uniform(1.0, 2.5), rng.uniform(1.0, 3.0)
    sheet.height -= depth * np.exp(-((distance / width) ** 2))
    return distance <= width


def _dent(rng, sheet: Sheet, size: int) -> np.ndarray:
    radius, depth = rng.uniform(6, 18) * max(size / 256, 0.5), rng.uniform(2, 6)
    cx, cy = rng.uniform(radius, size - radius, 2)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    r2 = (x - cx) ** 2 + (y - cy) ** 2
    sheet.height -= depth * np.exp(-r2 / (2 * (radius / 2) ** 2))
    return r2 <= radius**2


def _inclusion(rng, sheet: Sheet, size: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    centre = rng.uniform(10, size - 10, 2)
    for _ in range(rng.integers(1, 6)):
        cx, cy = centre + rng.normal(0, 6, 2)
        radius = rng.uniform(1.5, 4)
        r2 = (x - cx) ** 2 + (y - cy) ** 2
        sheet.height += (
            rng.choice([-1, 1]) * rng.uniform(1, 2) * np.exp(-r2 / (2 * (radius / 2) ** 2))
        )
        speck = r2 <= radius**2
        sheet.albedo[speck] *= rng.uniform(0.4, 0.7)
        mask |= speck
    return mask


def _patch(rng, sheet: Sheet, size: int) -> np.ndarray:
    blob = _blob(rng, size, rng.uniform(15, 45) * size / 256)
    sheet.albedo[blob] *= rng.choice([rng.uniform(0.55, 0.8), rng.uniform(1.15, 1.3)])
    sheet.gloss[blob] *= rng.uniform(0.3, 0.7)
    return blob


def _rust(rng, sheet: Sheet, size: int) -> np.ndarray:
    blob = _blob(rng, size, rng.uniform(10, 35) * size / 256)
    texture = 0.5 + 0.15 * _smooth_noise(rng, size, 1.5)
    sheet.albedo[blob] *= np.clip(texture[blob], 0.2, 0.9)
    sheet.gloss[blob] = 0.05
    return blob


def _roll_print(rng, sheet: Sheet, size: int) -> np.ndarray:
    band = np.zeros((size, size), bool)
    width = int(rng.uniform(0.1, 0.25) * size)
    top = int(rng.integers(0, size - width))
    band[top : top + width] = True
    x = np.arange(size, dtype=np.float64)
    ridges = rng.uniform(0.4, 1.0) * np.sin(2 * np.pi * x / rng.uniform(6, 12))
    sheet.height[band] += np.broadcast_to(ridges, (size, size))[band]
    return band


DRAW = {
    "scratch": _scratch,
    "dent": _dent,
    "inclusion": _inclusion,
    "patch": _patch,
    "rust": _rust,
    "roll_print": _roll_print,
}


def simulate_sheet(rng: np.random.Generator, cfg: SimulationConfig) -> Sheet:
    sheet = _background(rng, cfg.size)
    names = sorted(k for k, v in cfg.defect_weights.items() if v > 0)
    weights = np.array([cfg.defect_weights[k] for k in names])
    for _ in range(rng.integers(0, cfg.max_defects + 1)):
        name = str(rng.choice(names, p=weights / weights.sum()))
        drawn = DRAW[name](rng, sheet, cfg.size)
        # A later defect lies on top of an earlier one.
        sheet.mask[drawn] = STEEL_CLASSES.index(name)
        sheet.defects.append(name)
    sheet.albedo = np.clip(sheet.albedo, 0.02, 1.0)
    return sheet


def render(sheet: Sheet, lights: np.ndarray, cfg: SimulationConfig, rng) -> np.ndarray:
    """(K, H, W) intensities in 0-1 under each light."""
    normals = normals_from_height(sheet.height)
    lambert = np.clip(np.einsum("hwc,kc->khw", normals, lights), 0, None) * sheet.albedo
    halfway = lights + np.array([0.0, 0.0, 1.0])
    halfway /= np.linalg.norm(halfway, axis=1, keepdims=True)
    highlight = np.clip(np.einsum("hwc,kc->khw", normals, halfway), 0, None) ** cfg.shininess
    captures = lambert + cfg.specular * sheet.gloss * highlight
    captures += cfg.noise * rng.standard_normal(captures.shape)
    return np.clip(captures, 0, 1)

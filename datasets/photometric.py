"""Calibrated Lambertian photometric stereo and the paper's three steel maps. No I/O beyond
reading a lights file.

Frame: x along image columns (right), y along image rows (down), z towards the camera. A light is
the unit vector towards it; ``azimuth`` turns from +x towards +y, ``elevation`` rises from the
image plane. A height field ``h(x, y)`` has the normal ``(-h_x, -h_y, 1) / norm``.

Maps (Saiz et al. 2021 stack them as R, G, B):
- curvature: mean curvature of the surface recovered from the x/y gradients (grooves, dents and
  ridges; blind to colour);
- range: gradient magnitude (where the surface tilts);
- texture: albedo (discolouration, rust, patches; blind to relief).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from defectforge.core.errors import DataError

MAP_NAMES = ("curvature", "range", "texture")
# Lights this close to one plane cannot separate the three normal components.
MIN_CONDITION = 1e-2
# Below this the surface faces away from the camera; gradients would explode.
MIN_NZ = 0.05
# Percentile clipping of a 16-bit or float map to 8 bits; recorded in the dataset manifest.
DEFAULT_CLIP_PERCENTILES = (1.0, 99.0)


def light_from_angles(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    azimuth, elevation = np.radians(azimuth_deg), np.radians(elevation_deg)
    return np.array(
        [
            np.cos(elevation) * np.cos(azimuth),
            np.cos(elevation) * np.sin(azimuth),
            np.sin(elevation),
        ]
    )


def check_lights(lights: np.ndarray, where: str | Path) -> np.ndarray:
    """``lights`` (K, 3) as unit vectors, refusing fewer than 3 or (nearly) coplanar ones."""
    lights = np.asarray(lights, dtype=np.float64)
    if lights.ndim != 2 or lights.shape[1] != 3:
        raise DataError(where, f"lights have shape {lights.shape}", "give K vectors [x, y, z]")
    if len(lights) < 3:
        raise DataError(
            where,
            f"{len(lights)} light(s)",
            "photometric stereo needs at least 3 lights in different directions",
        )
    norms = np.linalg.norm(lights, axis=1, keepdims=True)
    if (norms < 1e-9).any():
        raise DataError(where, "a light direction is the zero vector", "give unit vectors")
    lights = lights / norms
    singular = np.linalg.svd(lights, compute_uv=False)
    if singular[-1] / singular[0] < MIN_CONDITION:
        raise DataError(
            where,
            "the light directions are (nearly) coplanar, so the normals are not determined",
            "use lights at different azimuths and at least two elevations, or add lights",
        )
    return lights


def read_lights(path: str | Path) -> np.ndarray:
    """A ``lights.json``: ``{"lights": [[x, y, z], ...]}`` or ``{"lights": [{"azimuth": a,
    "elevation": e}, ...]}`` (degrees); K lights in the order of the sorted capture files."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())["lights"]
        vectors = [
            light_from_angles(float(e["azimuth"]), float(e["elevation"]))
            if isinstance(e, dict)
            else np.asarray(e, dtype=np.float64)
            for e in entries
        ]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            path,
            f"not a lights file ({type(err).__name__}: {err})",
            'write {"lights": [[x, y, z], ...]} or [{"azimuth": deg, "elevation": deg}, ...]',
        ) from None
    return check_lights(np.array(vectors), path)


def _solve(observations: np.ndarray, lights: np.ndarray) -> np.ndarray:
    """Least squares ``lights @ g = observations`` for (K, N) observations -> (N, 3)."""
    return (np.linalg.pinv(lights) @ observations).T


def _robust_solve(observations: np.ndarray, lights: np.ndarray) -> np.ndarray:
    """Per pixel, drop the darkest (shadow) and brightest (highlight) observation, then solve
    with the remaining lights; pixels are grouped by which pair was dropped."""
    k = len(lights)
    darkest, brightest = observations.argmin(axis=0), observations.argmax(axis=0)
    brightest = np.where(brightest == darkest, (darkest + 1) % k, brightest)
    solved = np.empty((observations.shape[1], 3))
    for low in range(k):
        for high in range(k):
            pixels = np.flatnonzero((darkest == low) & (brightest == high))
            if low == high or not pixels.size:
                continue
            keep = [i for i in range(k) if i not in (low, high)]
            subset = lights[keep]
            singular = np.linalg.svd(subset, compute_uv=False)
            use = keep if singular[-1] / singular[0] >= MIN_CONDITION else list(range(k))
            solved[pixels] = _solve(observations[use][:, pixels], lights[use])
    return solved


def photometric_stereo(
    captures: np.ndarray, lights: np.ndarray, robust: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Normals (H, W, 3) and albedo (H, W) from K captures (K, H, W, linear intensity).

    ``robust`` needs K >= 5 so that 3 observations remain after dropping two per pixel.
    """
    captures = np.asarray(captures, dtype=np.float64)
    k, height, width = captures.shape
    if k != len(lights):
        raise ValueError(f"{k} captures but {len(lights)} lights")
    if robust and k < 5:
        raise ValueError(f"the robust option drops 2 of {k} observations per pixel; needs >= 5")
    observations = captures.reshape(k, -1)
    scaled = (_robust_solve if robust else _solve)(observations, lights)
    albedo = np.linalg.norm(scaled, axis=1)
    normals = scaled / np.maximum(albedo, 1e-12)[:, None]
    flat = albedo < 1e-9
    normals[flat] = (0.0, 0.0, 1.0)
    return normals.reshape(height, width, 3), albedo.reshape(height, width)


def gradients(normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surface slopes h_x, h_y from unit normals."""
    nz = np.maximum(normals[..., 2], MIN_NZ)
    return -normals[..., 0] / nz, -normals[..., 1] / nz


def normals_from_height(height: np.ndarray) -> np.ndarray:
    hy, hx = np.gradient(height)
    normals = np.stack([-hx, -hy, np.ones_like(height)], axis=-1)
    return normals / np.linalg.norm(normals, axis=-1, keepdims=True)


def steel_maps(normals: np.ndarray, albedo: np.ndarray, smoothing: float = 1.0) -> np.ndarray:
    """(H, W, 3) float: curvature, range, texture (see the module docstring)."""
    hx, hy = gradients(normals)
    if smoothing:
        hx = cv2.GaussianBlur(hx, (0, 0), smoothing)
        hy = cv2.GaussianBlur(hy, (0, 0), smoothing)
    scale = np.sqrt(1 + hx**2 + hy**2)
    # Mean curvature of z = h(x, y) (times 2); concave (a dent's floor) is positive.
    curvature = np.gradient(hx / scale, axis=1) + np.gradient(hy / scale, axis=0)
    return np.stack([curvature, np.sqrt(hx**2 + hy**2), albedo], axis=-1)


def to_uint8(
    values: np.ndarray, percentiles: tuple[float, float] = DEFAULT_CLIP_PERCENTILES
) -> np.ndarray:
    """One map to 8 bits: 8-bit input as it is; otherwise clip at the map's own low/high
    percentiles and scale linearly to 0-255 (robust to a few hot or dead pixels)."""
    if values.dtype == np.uint8:
        return values
    values = values.astype(np.float64)
    low, high = np.percentile(values, percentiles)
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.round(np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def stack_maps(maps: np.ndarray, percentiles=DEFAULT_CLIP_PERCENTILES) -> np.ndarray:
    """(H, W, 3) float maps -> the RGB image the networks see."""
    return np.stack([to_uint8(maps[..., i], percentiles) for i in range(3)], axis=-1)


@dataclass(frozen=True)
class Normalisation:
    """How maps became 8 bits; stored in the manifest so prediction does the same."""

    percentiles: tuple[float, float] = DEFAULT_CLIP_PERCENTILES
    rule: str = (
        "8-bit maps as they are; others clipped at these per-map percentiles, scaled to 0-255"
    )

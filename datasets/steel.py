"""Photometric-stereo steel on disk: read a sample as the paper's RGB = curvature/range/texture
image, and write the simulated stand-in.

A sample is a folder holding ``mask.png`` (class ids) and either
- precomputed maps: one single-channel image per map (``curvature``, ``range``, ``texture`` by
  default; 8 or 16 bit PNG/TIFF or float TIFF), or
- raw captures: K >= 3 images under different lights (any names, sorted order = light order)
  and a ``lights.json`` in the folder or in a folder above it (see ``photometric.read_lights``).
Sample folders may sit under ``train/``, ``val/``, ``test/``; otherwise a hash of the id splits.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from defectforge.core.config import TypedConfig, option
from defectforge.core.errors import DataError
from defectforge.core.outputs import publish_dir
from defectforge.datasets.contract import SPLITS
from defectforge.datasets.images import decode_file
from defectforge.datasets.photometric import (
    DEFAULT_CLIP_PERCENTILES,
    MAP_NAMES,
    photometric_stereo,
    read_lights,
    stack_maps,
    steel_maps,
    to_uint8,
)
from defectforge.datasets.samples import IMAGE_SUFFIXES, SampleRef, hash_split, require_folder
from defectforge.datasets.steel_sim import (
    STEEL_CLASSES,
    SimulationConfig,
    render,
    simulate_sheet,
)

MASK_FILE, BINARY_MASK_FILE, LIGHTS_FILE = "mask.png", "mask_binary.png", "lights.json"
SIMULATION_FILE = "simulation.json"


def _clip_ok(percentiles: tuple[float, ...]) -> bool:
    return len(percentiles) == 2 and 0 <= percentiles[0] < percentiles[1] <= 100


@dataclass(frozen=True)
class SteelOptions(TypedConfig):
    """How a steel sample becomes one RGB image; recorded in the dataset manifest."""

    kind = "steel options"

    map_names: tuple[str, ...] = option(
        MAP_NAMES,
        "steel: file stems of the R, G, B maps in each sample folder",
        lambda names: len(names) == 3 and len(set(names)) == 3,
        "three different names",
        flag="--maps",
    )
    robust: bool = option(
        False, "steel captures: drop each pixel's darkest and brightest light (>= 5 lights)"
    )
    clip_percentiles: tuple[float, ...] = option(
        DEFAULT_CLIP_PERCENTILES,
        "steel: 16-bit/float maps are clipped at these percentiles, then scaled to 8 bits",
        _clip_ok,
        "low,high with 0 <= low < high <= 100",
    )


def _images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in (MASK_FILE, BINARY_MASK_FILE)
    )


def _map_files(folder: Path, names: tuple[str, ...]) -> list[Path] | None:
    found = {p.stem: p for p in _images(folder)}
    return [found[n] for n in names] if all(n in found for n in names) else None


def _lights_file(folder: Path, root: Path) -> Path | None:
    """The nearest lights.json from the sample folder up to (not beyond) the dataset root."""
    folder, root = folder.resolve(), root.resolve()
    for candidate in (folder, *folder.parents):
        if (candidate / LIGHTS_FILE).is_file():
            return candidate / LIGHTS_FILE
        if candidate == root:
            return None
    return None


def discover_steel(
    root: str | Path, dataset: str, split_ratios: tuple[float, float, float]
) -> list[SampleRef]:
    """Every folder under ``root`` holding a ``mask.png`` is a sample."""
    root = Path(root)
    require_folder(root, "--root")
    refs = []
    for mask in sorted(root.rglob(MASK_FILE)):
        folder = mask.parent
        relative = folder.relative_to(root)
        sample_id = sample_name(folder, root)
        split = next((p for p in relative.parts if p in SPLITS), None)
        refs.append(
            SampleRef(
                sample_id,
                str(folder),
                str(mask),
                split or hash_split(f"{dataset}/{sample_id}", split_ratios),
            )
        )
    if not refs:
        raise DataError(
            root,
            f"no steel samples (folders with a {MASK_FILE}) found",
            "give each sample a folder with its maps or captures and mask.png "
            "(`defectforge data simulate-steel` writes an example)",
        )
    return refs


def steel_sample_folders(root: str | Path) -> list[Path]:
    """For prediction: every folder under ``root`` (itself included) holding a sample's images,
    its three maps or its captures; no mask needed."""
    root = Path(root)
    require_folder(root, "--images")
    candidates = [root, *sorted(p for p in root.rglob("*") if p.is_dir())]
    folders = [folder for folder in candidates if _images(folder)]
    if not folders:
        raise DataError(
            root,
            "no steel samples (folders with maps or captures) found",
            "point --images at a folder of sample folders, as `data build --source steel` reads",
        )
    return folders


def sample_name(folder: Path, root: Path) -> str:
    """A sample's id: its path under the root with / as _, as the dataset build names it."""
    relative = folder.relative_to(root)
    return relative.as_posix().replace("/", "_") if relative.parts else folder.name


def _read_any_depth(path: Path) -> np.ndarray:
    return decode_file(
        path, "steel map or capture", flags=cv2.IMREAD_ANYDEPTH | cv2.IMREAD_GRAYSCALE
    )


def _same_size(paths: list[Path], arrays: list[np.ndarray]) -> None:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        sizes = ", ".join(
            f"{p.name} {a.shape[1]}x{a.shape[0]}" for p, a in zip(paths, arrays, strict=True)
        )
        raise DataError(
            paths[0].parent,
            f"images of one sample differ in size ({sizes})",
            "capture or export every image of a sample at one size",
        )


def _linear(array: np.ndarray) -> np.ndarray:
    """A capture's intensities on a 0-1 scale (8 or 16 bit, or float as it is)."""
    if array.dtype == np.uint8:
        return array / 255.0
    if array.dtype == np.uint16:
        return array / 65535.0
    return array.astype(np.float64)


def read_steel_image(folder: str | Path, root: str | Path, options: SteelOptions) -> np.ndarray:
    """(H, W, 3) uint8: R = curvature, G = range, B = texture."""
    folder = Path(folder)
    maps = _map_files(folder, options.map_names)
    if maps:
        arrays = [_read_any_depth(p) for p in maps]
        _same_size(maps, arrays)
        return np.stack([to_uint8(a, options.clip_percentiles) for a in arrays], axis=-1)
    lights_path = _lights_file(folder, Path(root))
    if lights_path is None:
        raise DataError(
            folder,
            f"neither the maps {list(options.map_names)} nor a {LIGHTS_FILE} for raw captures",
            f"add the three maps, or the captures with a {LIGHTS_FILE} (here or in a parent folder)",
        )
    lights = read_lights(lights_path)
    if options.robust and len(lights) < 5:
        raise DataError(
            lights_path,
            f"--robust drops each pixel's darkest and brightest of {len(lights)} lights and "
            "needs >= 5",
            "leave out --robust, or capture under more lights",
        )
    captures = _images(folder)
    if len(captures) != len(lights):
        raise DataError(
            folder,
            f"{len(captures)} capture images but {lights_path} lists {len(lights)} lights",
            "give one capture per light, named so that sorting puts them in the lights' order",
        )
    arrays = [_read_any_depth(p) for p in captures]
    _same_size(captures, arrays)
    normals, albedo = photometric_stereo(
        np.stack([_linear(a) for a in arrays]), lights, options.robust
    )
    return stack_maps(steel_maps(normals, albedo), options.clip_percentiles)


def folder_digest(folder: str | Path, root: str | Path) -> str:
    """Identity of a sample's inputs: its files, and the lights file it uses."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    lights = _lights_file(folder, Path(root))
    for path in files + ([lights] if lights and lights.parent != folder else []):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# --- the simulated stand-in ---------------------------------------------------------------------


def _write_png(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), array):
        raise OSError(f"{path}: could not write")


def write_simulation(cfg: SimulationConfig, out: str | Path, overwrite: bool = False) -> dict:
    """Render ``cfg.n`` sheets into ``out`` (captures, lights.json, masks, classes.yaml and
    simulation.json with the config and counts); published whole or not at all."""
    rng = np.random.default_rng(cfg.seed)
    lights = cfg.light_directions()
    counts = {name: 0 for name in STEEL_CLASSES[1:]}
    with publish_dir(out, overwrite) as staging:
        (staging / LIGHTS_FILE).write_text(json.dumps({"lights": lights.tolist()}, indent=1))
        (staging / "classes.yaml").write_text(yaml.safe_dump({"classes": list(STEEL_CLASSES)}))
        defect_free = 0
        for index in tqdm(range(cfg.n), desc="rendering sheets", unit="sheet"):
            sheet = simulate_sheet(rng, cfg)
            folder = staging / f"sheet{index:05d}"
            folder.mkdir()
            captures = render(sheet, lights, cfg, rng)
            for k, capture in enumerate(captures):
                _write_png(
                    folder / f"capture_{k:02d}.png", np.round(capture * 65535).astype(np.uint16)
                )
            _write_png(folder / MASK_FILE, sheet.mask)
            _write_png(folder / BINARY_MASK_FILE, (sheet.mask > 0).astype(np.uint8))
            for name in sheet.defects:
                counts[name] += 1
            defect_free += not sheet.defects
        summary = {
            "simulated": True,
            "note": "synthetic stand-in for photometric-stereo steel; not real data",
            "config": asdict(cfg),
            "classes": list(STEEL_CLASSES),
            "defects_drawn": counts,
            "defect_free_sheets": defect_free,
        }
        (staging / SIMULATION_FILE).write_text(json.dumps(summary, indent=1))
    return summary


def write_preview(simulation: str | Path, path: str | Path, samples: int = 4) -> Path:
    """PNG: per sample, three of its captures, the three maps, the stacked RGB and the mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    simulation = Path(simulation)
    lights = read_lights(simulation / LIGHTS_FILE)
    sheets, shown = [], set()
    for folder in sorted(simulation.glob("sheet*")):
        classes = set(np.unique(cv2.imread(str(folder / MASK_FILE), cv2.IMREAD_UNCHANGED))) - {0}
        if classes - shown and len(sheets) < samples:  # each row shows a class not seen yet
            sheets.append(folder)
            shown |= classes
    picks = np.linspace(0, len(lights) - 1, 3).round().astype(int)
    titles = [f"capture {k}" for k in picks] + [*MAP_NAMES, "RGB", "mask"]
    figure, axes = plt.subplots(
        len(sheets), len(titles), figsize=(2 * len(titles), 2 * len(sheets))
    )
    for row, folder in zip(np.atleast_2d(axes), sheets, strict=True):
        captures = [_read_any_depth(p) for p in _images(folder)]
        rgb = read_steel_image(folder, simulation, SteelOptions())
        mask = cv2.imread(str(folder / MASK_FILE), cv2.IMREAD_UNCHANGED)
        panels = [_linear(captures[k]) for k in picks] + [rgb[..., i] for i in range(3)]
        panels += [rgb, mask]
        for axis, panel, title in zip(row, panels, titles, strict=True):
            is_mask = panel is mask
            axis.imshow(
                panel,
                cmap="tab10" if is_mask else "gray",
                vmin=0,
                vmax=9 if is_mask else None,
                interpolation="nearest",
            )
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    figure.suptitle("Simulated galvanized steel (not real data)", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=72, bbox_inches="tight")
    plt.close(figure)
    return path

"""GAN runs side by side: their SWD over kimg, and their sample grids at one kimg.

For ablations (DiffAugment on vs off, two seeds, two profiles): every run's snapshots score SWD
against the same real crops when they share data, resolution and seed, so the curves compare.
Reads only the runs' own files (``metrics.json`` of a finished run and ``progress.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from defectforge.core.errors import DataError
from defectforge.core.files import pyplot, save_png, scratch_folder, write_json_atomic
from defectforge.core.outputs import publish_dir
from defectforge.core.storage import Location, local_folder
from defectforge.gan.checkpoint import SAMPLES_DIR, kimg_of, snapshot_name

PROGRESS_FILE, SUMMARY_FILE = "progress.jsonl", "metrics.json"
CURVES_FILE, COMPARISON_FILE = "swd.png", "comparison.json"


def swd_history(run: str | Path | Location) -> list[dict]:
    """Each snapshot's metrics in kimg order, one per kimg (a resumed run repeats lines); the
    run may be on a store. A finished run's summary wins where it has a kimg; the progress
    lines add the snapshots of a run resumed past it and still training."""
    run = Location.of(run)
    summary, progress = run / SUMMARY_FILE, run / PROGRESS_FILE
    if not (summary.is_file() or progress.is_file()):
        raise DataError(run, "no metrics.json or progress.jsonl", "name a `gan train` run folder")
    lines = []
    if progress.is_file():
        lines += [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    if summary.is_file():
        lines += json.loads(summary.read_text())["history"]
    by_kimg = {line["kimg"]: line for line in lines if "swd" in line}
    return [by_kimg[kimg] for kimg in sorted(by_kimg)]


def _labelled(picture: np.ndarray, label: str) -> np.ndarray:
    band = np.full((24, picture.shape[1], 3), 255, np.uint8)
    cv2.putText(band, label, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    return np.vstack([band, picture])


def _sample_grid(run: str | Path | Location, kimg: float) -> np.ndarray:
    return _grid_picture(Location.of(run) / SAMPLES_DIR / f"{snapshot_name(kimg)}.png", kimg)


def _grid_picture(path: Path | Location, kimg: float) -> np.ndarray:
    location = Location.of(path)
    encoded = location.read_bytes() if location.is_file() else b""
    grid = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR) if encoded else None
    if grid is None:
        kept = sorted(
            f.name.removesuffix(".png")
            for f in location.parent.files(".png")
            if f.name.startswith("kimg_")
        )
        raise DataError(
            path,
            f"no sample grid at kimg {kimg:g}",
            "pick a kimg every run reached (this run's grids: "
            + (", ".join(f"{kimg_of(name):g}" for name in kept) or "none")
            + ")",
        )
    return grid


def write_comparison(
    runs: dict[str, str | Path], out: str | Path, kimg: float, overwrite: bool = False
) -> list[dict]:
    """``swd.png`` (every run's SWD curve), ``samples_kimgK.png`` (their grids at ``kimg``, side
    by side) and ``comparison.json`` (the runs and the returned rows), published as the folder
    ``out``; returns per run its label, SWD at ``kimg`` and lowest SWD."""
    plt = pyplot()
    histories = {label: swd_history(run) for label, run in runs.items()}
    grids = [_labelled(_sample_grid(run, kimg), label) for label, run in runs.items()]
    rows = [_summary_row(label, history, kimg) for label, history in histories.items()]
    with publish_dir(out, overwrite, inputs=tuple(runs.values()), kind="gan comparison") as folder:
        figure, axis = plt.subplots(figsize=(6.4, 4))
        for label, history in histories.items():
            axis.plot([h["kimg"] for h in history], [h["swd"] for h in history], "o-", label=label)
        axis.set(xlabel="kimg", ylabel="SWD x1e3 (lower is closer to the real images)")
        axis.legend(fontsize=8)
        save_png(figure, folder / CURVES_FILE)
        height = max(grid.shape[0] for grid in grids)
        padded = [
            np.pad(g, ((0, height - g.shape[0]), (0, 8), (0, 0)), constant_values=255)
            for g in grids
        ]
        # The folder is published whole, so plain writes into it are safe.
        grids_file = folder / f"samples_kimg{kimg:g}.png"
        if not cv2.imwrite(str(grids_file), np.hstack(padded)):
            raise OSError(f"{grids_file}: the PNG could not be written")
        runs_by_label = {label: str(run) for label, run in runs.items()}
        write_json_atomic(
            folder / COMPARISON_FILE, {"kimg": kimg, "runs": runs_by_label, "rows": rows}
        )
    return rows


def _summary_row(label: str, history: list[dict], kimg: float) -> dict:
    lowest = min(history, key=lambda h: h["swd"])
    return {
        "run": label,
        "swd_at_kimg": next((h["swd"] for h in history if h["kimg"] == kimg), None),
        "lowest_swd": lowest["swd"],
        "lowest_at_kimg": lowest["kimg"],
    }


RUN_CURVES_FILE, RUN_GRIDS_FILE = "swd.png", "samples.png"
# At most this many snapshot grids in a run's montage (evenly spaced, the last always in).
MONTAGE_GRIDS = 30


def write_plots(run: Location, history: list[dict]) -> list[Location]:
    """A run's own plots in ``RUN/plots`` (drawn here, then published there): its curves over
    kimg (SWD to all real crops and to defect crops; the share of samples holding a defect
    against the real crops' share) and the sample grid of every snapshot, labelled by kimg."""
    with scratch_folder("plots") as scratch:
        written = write_run_plots(local_folder(run / SAMPLES_DIR), Path(scratch), history)
        (run / "plots").upload(scratch)
    return [run / "plots" / path.name for path in written]


def write_run_plots(samples: Path, folder: Path, history: list[dict]) -> list[Path]:
    """``write_plots`` into the local ``folder``, from the sample grids in ``samples``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [_run_curves(history, folder / RUN_CURVES_FILE)]
    montage = _montage(samples, [row["kimg"] for row in history])
    if montage is not None:
        path = folder / RUN_GRIDS_FILE
        write_picture(path, montage)
        paths.append(path)
    return paths


def _run_curves(history: list[dict], path: Path) -> Path:
    plt = pyplot()
    kimg = [row["kimg"] for row in history]
    shares = [key for key in ("defect_share", "drawn_share") if key in history[-1]]
    figure, axes = plt.subplots(1, 2 if shares else 1, figsize=(11 if shares else 6.4, 4))
    axes = np.atleast_1d(axes)
    for key, label in (("swd", "to all real crops"), ("swd_defect", "to real defect crops")):
        points = [(k, row[key]) for k, row in zip(kimg, history, strict=True) if key in row]
        if points:
            axes[0].plot(*zip(*points, strict=True), "o-", label=label)
    axes[0].set(xlabel="kimg", ylabel="SWD x1e3 (lower is closer)", title="distance")
    axes[0].legend(fontsize=8)
    if shares:
        names = {"defect_share": "samples holding a defect", "drawn_share": "drawn masks with one"}
        for key in shares:
            points = [(k, row[key]) for k, row in zip(kimg, history, strict=True) if key in row]
            axes[1].plot(*zip(*points, strict=True), "o-", label=names[key])
        real = history[-1].get("real_defect_share")
        if real is not None:
            axes[1].axhline(real, color="grey", linestyle="--", label="real crops")
        axes[1].set(xlabel="kimg", ylabel="share of samples", ylim=(0, 1), title="defects")
        axes[1].legend(fontsize=8)
    return save_png(figure, path)


def _montage(samples: Path, kimgs: list[float]) -> np.ndarray | None:
    present = [k for k in kimgs if (samples / f"{snapshot_name(k)}.png").is_file()]
    if not present:
        return None
    step = max(1, -(-len(present) // MONTAGE_GRIDS))
    chosen = sorted({*present[::step], present[-1]})
    grids = [
        _labelled(_grid_picture(samples / f"{snapshot_name(k)}.png", k), f"kimg {k:g}")
        for k in chosen
    ]
    height = max(g.shape[0] for g in grids)
    width = max(g.shape[1] for g in grids)
    tiles = [
        np.pad(
            g,
            ((0, height - g.shape[0] + 8), (0, width - g.shape[1] + 8), (0, 0)),
            constant_values=255,
        )
        for g in grids
    ]
    columns = min(6, len(tiles))
    blank = np.full_like(tiles[0], 255)
    tiles += [blank] * (-len(tiles) % columns)
    rows = [np.hstack(tiles[i : i + columns]) for i in range(0, len(tiles), columns)]
    return np.vstack(rows)


def write_picture(path: Path, picture: np.ndarray) -> Path:
    """A BGR picture as PNG, written under a temporary name and renamed."""
    from defectforge.core.files import atomic_write

    def write(tmp: str) -> None:
        ok, data = cv2.imencode(".png", picture)
        if not ok:
            raise OSError(f"{path}: the PNG could not be encoded")
        Path(tmp).write_bytes(data.tobytes())

    return atomic_write(path, write)

"""GAN runs side by side: their SWD over kimg, and their sample grids at one kimg.

For ablations (DiffAugment on vs off, two seeds, two profiles): every run's snapshots score SWD
against the same real crops when they share data, resolution and seed, so the curves compare.
Reads only the runs' own files (``metrics.json`` of a finished run, else ``progress.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from defectforge.datasets.errors import DataError  # noqa: E402
from defectforge.datasets.files import save_png, write_json_atomic  # noqa: E402
from defectforge.datasets.outputs import publish_dir  # noqa: E402

PROGRESS_FILE, SUMMARY_FILE = "progress.jsonl", "metrics.json"
CURVES_FILE, COMPARISON_FILE = "swd.png", "comparison.json"


def swd_history(run: Path) -> list[dict]:
    """Each snapshot's metrics in kimg order, one per kimg (a resumed run repeats lines)."""
    summary, progress = run / SUMMARY_FILE, run / PROGRESS_FILE
    if summary.is_file():
        lines = json.loads(summary.read_text())["history"]
    elif progress.is_file():
        lines = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    else:
        raise DataError(run, "no metrics.json or progress.jsonl", "name a `gan train` run folder")
    by_kimg = {line["kimg"]: line for line in lines if "swd" in line}
    return [by_kimg[kimg] for kimg in sorted(by_kimg)]


def _labelled(picture: np.ndarray, label: str) -> np.ndarray:
    band = np.full((24, picture.shape[1], 3), 255, np.uint8)
    cv2.putText(band, label, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    return np.vstack([band, picture])


def _sample_grid(run: Path, kimg: float) -> np.ndarray:
    path = run / "samples" / f"kimg_{kimg:09.3f}.png"
    grid = cv2.imread(str(path))
    if grid is None:
        raise DataError(path, f"no sample grid at kimg {kimg:g}", "pick a kimg every run reached")
    return grid


def write_comparison(
    runs: dict[str, Path], out: Path, kimg: float, overwrite: bool = False
) -> list[dict]:
    """``swd.png`` (every run's SWD curve), ``samples_kimgK.png`` (their grids at ``kimg``, side
    by side) and ``comparison.json`` (the runs and the returned rows), published as the folder
    ``out``; returns per run its label, SWD at ``kimg`` and lowest SWD."""
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

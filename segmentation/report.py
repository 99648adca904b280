"""PNG pictures of a run: training curves, per-class IoU, confusion matrix, validation grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from defectforge.core.files import pyplot, save_png
from defectforge.datasets.contract import decode_png, read_split_table
from defectforge.segmentation.checkpoint import load_model
from defectforge.segmentation.inference import predict_logits
from defectforge.segmentation.overlay import overlay

GRID_IMAGES = 6


def plot_curves(history: list[dict], path: Path) -> None:
    plt = pyplot()
    epochs = [row["epoch"] for row in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [row["train_loss"] for row in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    for key, label in (
        ("val_binary_defect_iou", "binary defect IoU"),
        ("val_mean_defect_iou", "mean defect IoU"),
    ):
        right.plot(epochs, [row.get(key) for row in history], marker="o", label=label)
    right.set(xlabel="epoch", ylabel="IoU", title="Validation", ylim=(0, 1))
    right.legend()
    save_png(figure, path)


def plot_per_class_iou(per_class: dict, path: Path) -> None:
    plt = pyplot()
    names = list(per_class)
    values = [per_class[n] or 0.0 for n in names]
    figure, axis = plt.subplots(figsize=(1.3 * len(names) + 2, 3.6))
    bars = axis.bar(names, values, color="#4878a8")
    axis.bar_label(bars, fmt="%.3f")
    axis.set(ylabel="IoU", ylim=(0, 1), title="Per-class IoU (validation)")
    save_png(figure, path)


def plot_confusion(matrix: list[list[int]], names: list[str], path: Path) -> None:
    plt = pyplot()
    cm = np.asarray(matrix, dtype=np.float64)
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    figure, axis = plt.subplots(figsize=(1.1 * len(names) + 2.5, 1.1 * len(names) + 2))
    axis.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(rows):
        axis.text(
            j,
            i,
            f"{value:.2f}",
            ha="center",
            va="center",
            color="white" if value > 0.5 else "black",
        )
    axis.set(
        xticks=range(len(names)),
        yticks=range(len(names)),
        xticklabels=names,
        yticklabels=names,
        xlabel="predicted",
        ylabel="true",
        title="Confusion matrix (rows sum to 1)",
    )
    save_png(figure, path)


def plot_validation_grid(run_dir: Path, data_dir: str, path: Path) -> None:
    """Image | true mask overlay | predicted mask overlay, for the first validation images."""
    plt = pyplot()
    model, cfg = load_model(run_dir)
    table = read_split_table(data_dir, "val", columns=["id", "image", "mask"])
    rows = table.slice(0, GRID_IMAGES).to_pylist()
    figure, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for axis_row, row in zip(axes, rows, strict=True):
        image = decode_png(row["image"], cfg.channels)
        truth = decode_png(row["mask"], 0)
        if cfg.binary:
            truth = (truth > 0).astype(np.uint8)
        pred = predict_logits(model, cfg.batch_spec(), image).argmax(0).numpy().astype(np.uint8)
        shown = (
            image[:, :, 0] if cfg.channels == 1 else image,
            overlay(image, truth),
            overlay(image, pred),
        )
        for axis, picture, title in zip(
            axis_row, shown, (row["id"], "truth", "prediction"), strict=True
        ):
            axis.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=255)
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    save_png(figure, path)


def write_run_plots(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "metrics.json").read_text())
    best, plots = summary["best"], run_dir / "plots"
    written = [
        plots / "curves.png",
        plots / "per_class_iou.png",
        plots / "confusion_matrix.png",
        plots / "validation_grid.png",
    ]
    plot_curves(summary["history"], written[0])
    plot_per_class_iou(best["val_per_class_iou"], written[1])
    plot_confusion(best["val_confusion_matrix"], best["val_class_names"], written[2])
    plot_validation_grid(run_dir, summary["config"]["data"], written[3])
    return written


def plot_label_grid(rows: list[dict], channels: int, path: Path, columns: int = 4) -> None:
    """Synthetic images with their pseudo-masks, titled with confidence and the keep decision."""
    plt = pyplot()
    count = len(rows)
    lines = max(1, -(-count // columns))
    figure, axes = plt.subplots(
        lines, 2 * columns, figsize=(2.0 * 2 * columns, 2.2 * lines), squeeze=False
    )
    for axis in axes.flat:
        axis.axis("off")
    for index, row in enumerate(rows):
        image = decode_png(row["image"], channels)
        mask = decode_png(row["mask"], 0)
        line, column = divmod(index, columns)
        verdict = row["rejected"] or "kept"
        left, right = axes[line, 2 * column], axes[line, 2 * column + 1]
        left.imshow(image[:, :, 0] if channels == 1 else image, cmap="gray", vmin=0, vmax=255)
        left.set_title(f"conf {row['label_confidence']:.2f}", fontsize=7)
        right.imshow(overlay(image, mask))
        right.set_title(f"{row['defect_class'] or '-'} ({verdict})", fontsize=7)
    save_png(figure, path)


def plot_confidence_histogram(confidences: list[float], threshold: float, path: Path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.4))
    axis.hist(confidences, bins=30, range=(0, 1), color="#4878a8")
    axis.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:.2f}")
    axis.set(
        xlabel="label confidence (mean max-softmax over predicted defect pixels)",
        ylabel="images",
        title=f"Pseudo-label confidence ({len(confidences)} generated images)",
    )
    axis.legend()
    save_png(figure, path)


def plot_correction_quality(quality: dict, path: Path) -> None:
    """Labeller IoU on real validation images, raw and after each mask correction."""
    plt = pyplot()
    variants = list(quality)
    keys = (("binary_defect_iou", "binary defect IoU"), ("mean_defect_iou", "mean defect IoU"))
    positions = np.arange(len(variants))
    figure, axis = plt.subplots(figsize=(1.6 * len(variants) + 3, 3.6))
    for offset, (key, label) in zip((-0.2, 0.2), keys, strict=True):
        values = [quality[v][key] or 0.0 for v in variants]
        bars = axis.bar(positions + offset, values, width=0.4, label=label)
        axis.bar_label(bars, fmt="%.3f", fontsize=7)
    axis.set(
        xticks=positions,
        xticklabels=variants,
        ylim=(0, 1),
        ylabel="IoU",
        title="Labeller on real validation images, by mask correction",
    )
    axis.legend(loc="lower right")
    save_png(figure, path)


def plot_operating_point(calibration: dict, path: Path) -> None:
    """Recall and false-alarm rate against the probability threshold (at the chosen minimum
    area), with the chosen point marked: what moving the threshold would trade."""
    plt = pyplot()
    curve = calibration["curve"]
    point = calibration["operating_point"]
    thresholds = [row["threshold"] for row in curve]
    figure, axis = plt.subplots(figsize=(6.4, 4))
    axis.plot(
        thresholds, [row["recall"] for row in curve], "o-", label="recall (defective images NG)"
    )
    axis.plot(
        thresholds,
        [row["false_alarm_rate"] for row in curve],
        "s-",
        label="false-alarm rate (defect-free images NG)",
    )
    axis.axvline(point["threshold"], color="black", linestyle=":", label="chosen threshold")
    axis.set_xlabel("defect probability threshold")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(
        f"operating point: threshold {point['threshold']}, min area {point['min_area']} px "
        f"({calibration['images']} val images)",
        fontsize=9,
    )
    axis.legend(fontsize=8)
    save_png(figure, path)

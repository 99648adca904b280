"""``defectforge quickstart``: build -> train -> evaluate -> plots, on the bundled sample or a root."""

from __future__ import annotations

import json
from pathlib import Path

from defectforge.datasets.build import BuildConfig
from defectforge.segmentation.inference import evaluate_folder
from defectforge.segmentation.report import write_run_plots
from defectforge.trainables.data_jobs import build_parquet
from defectforge.trainables.runtime import ensure_ray
from defectforge.trainables.seg import config_from_manifest, run_seg_training

SAMPLE_ROOT = Path(__file__).resolve().parent.parent / "datasets" / "sample" / "neu-seg"
SAMPLE_EPOCHS = 12
FULL_EPOCHS = 5


def quickstart(data: str | None, out: Path, epochs: int | None = None) -> dict:
    """Run the whole backbone once and print where everything landed."""
    root = Path(data) if data else SAMPLE_ROOT
    epochs = epochs or (FULL_EPOCHS if data else SAMPLE_EPOCHS)
    ensure_ray()
    dataset = out / "dataset"
    print(f"[1/4] building Parquet from {root}")
    build_parquet(BuildConfig(source="neu-seg", root=str(root), out=str(dataset), overwrite=True))
    print(f"[2/4] training DeepLabV3+ (resnet18, {epochs} epochs) with Ray Train")
    cfg = config_from_manifest(
        dataset,
        arch="deeplabv3plus",
        encoder="resnet18",
        epochs=epochs,
        batch_size=8 if not data else 16,
    )
    run = out / "run"
    run_seg_training(cfg, run)
    print("[3/4] evaluating on the validation images at native size")
    metrics = evaluate_folder(run, root / "images" / "val", root / "masks" / "val")
    (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    print("[4/4] writing plots")
    plots = write_run_plots(run)
    print(
        f"\nvalidation binary defect IoU {metrics['binary_defect_iou']:.4f}, mean defect IoU "
        f"{metrics['mean_defect_iou'] or 0:.4f}"
    )
    print(f"dataset: {dataset}\nmodel: {run}/model.pt (+ config.json)\nmetrics: {out}/eval.json")
    print("plots: " + ", ".join(str(p) for p in plots))
    return metrics

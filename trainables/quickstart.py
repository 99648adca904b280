"""``defectforge quickstart``: build -> train -> evaluate -> plots, on the bundled sample or a root."""

from __future__ import annotations

import json
from pathlib import Path

from defectforge.datasets.build import BuildConfig
from defectforge.datasets.steel import SteelOptions, write_simulation
from defectforge.datasets.steel_sim import SimulationConfig
from defectforge.segmentation.inference import evaluate_folder
from defectforge.segmentation.report import write_run_plots
from defectforge.trainables.data_jobs import build_parquet
from defectforge.trainables.runtime import ensure_ray
from defectforge.trainables.seg import config_from_manifest, evaluate_split, run_seg_training

SAMPLE_ROOT = Path(__file__).resolve().parent.parent / "datasets" / "sample" / "neu-seg"
SAMPLE_EPOCHS = 12
FULL_EPOCHS = 5
# The simulated steel stand-in when no rig data is given: 160 sheets of 128 px, 6 lights.
STEEL_SIMULATION = SimulationConfig(n=160, size=128, lights=6, seed=0)
STEEL_EPOCHS = 8


def quickstart(
    data: str | None, out: Path, epochs: int | None = None, source: str = "neu-seg"
) -> dict:
    """Run the whole backbone once and print where everything landed."""
    if source == "steel":
        return steel_quickstart(data, out, epochs or STEEL_EPOCHS)
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
    _print_outputs(dataset, run, out, plots)
    return metrics


def steel_quickstart(data: str | None, out: Path, epochs: int) -> dict:
    """The same on photometric-stereo steel: the given rig output (maps, or captures with
    lights.json), else a simulated stand-in rendered here; scored on the val split."""
    ensure_ray()
    root = Path(data) if data else out / "steel-sim"
    if not data:
        print(f"[0/4] rendering {STEEL_SIMULATION.n} simulated sheets (not real data) to {root}")
        write_simulation(STEEL_SIMULATION, root, overwrite=True)
    dataset = out / "dataset"
    print(f"[1/4] building Parquet from {root} (robust photometric stereo)")
    build_parquet(
        BuildConfig(
            source="steel",
            root=str(root),
            out=str(dataset),
            steel=SteelOptions(robust=True),
            overwrite=True,
        )
    )
    print(f"[2/4] training DeepLabV3+ (resnet18, {epochs} epochs) with Ray Train")
    cfg = config_from_manifest(
        dataset, arch="deeplabv3plus", encoder="resnet18", epochs=epochs, batch_size=16
    )
    run = out / "run"
    run_seg_training(cfg, run)
    print("[3/4] evaluating on the val split, whole images")
    metrics = evaluate_split(run, "val")
    (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    print("[4/4] writing plots")
    plots = write_run_plots(run)
    print(
        f"\nvalidation binary defect IoU {metrics['binary_defect_iou']:.4f}, per class "
        + ", ".join(
            f"{name} {iou:.2f}" if iou is not None else f"{name} (absent)"
            for name, iou in metrics["per_class_iou"].items()
        )
    )
    _print_outputs(dataset, run, out, plots)
    return metrics


def _print_outputs(dataset: Path, run: Path, out: Path, plots: list) -> None:
    print(f"dataset: {dataset}\nmodel: {run}/model.pt (+ config.json)\nmetrics: {out}/eval.json")
    print("plots: " + ", ".join(str(p) for p in plots))

"""``defectforge quickstart``: build -> train -> evaluate -> plots, in one command.

Sources: the bundled NEU-Seg sample (the default) or a NEU-Seg root; photometric-stereo steel
(rig output, or a simulated stand-in rendered on the spot); any folder of images with masks.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from defectforge.core.errors import ConfigError
from defectforge.core.files import write_json_atomic
from defectforge.datasets.build import BuildConfig
from defectforge.datasets.steel import SteelOptions, write_simulation
from defectforge.datasets.steel_sim import SimulationConfig
from defectforge.segmentation.inference import evaluate_dataset_split
from defectforge.trainables.data_jobs import build_parquet
from defectforge.trainables.runtime import ensure_ray
from defectforge.trainables.seg import config_from_manifest, run_seg_training
from defectforge.trainables.seg_feed import crop_limit

SAMPLE_ROOT = Path(__file__).resolve().parent.parent / "datasets" / "sample" / "neu-seg"
# Epochs: the bundled sample is tiny, so more of them; a full set needs fewer.
SAMPLE_EPOCHS, FULL_EPOCHS, STEEL_EPOCHS = 12, 5, 8
# The simulated steel stand-in when no rig data is given: 160 sheets of 128 px, 6 lights.
STEEL_SIMULATION = SimulationConfig(n=160, size=128, lights=6, seed=0)


def _build_config(source: str, data: str | None, out: Path, options: dict) -> BuildConfig:
    """What to build from: the given root, the bundled sample, or a simulation rendered here;
    ``options`` (build options the user gave) on top."""
    if source == "folder" and not data:
        raise ConfigError("quickstart --source folder needs --data, the folder of your images")
    steel = {"steel": SteelOptions(robust=True)} if source == "steel" else {}
    root = Path(data) if data else SAMPLE_ROOT
    if source == "steel" and not data:
        root = out / "steel-sim"
        print(f"[0/3] rendering {STEEL_SIMULATION.n} simulated sheets (not real data) to {root}")
        write_simulation(STEEL_SIMULATION, root, overwrite=True)
    return BuildConfig(source=source, root=str(root), **{**steel, **options})


def _epochs(source: str, data: str | None, epochs: int | None) -> int:
    if epochs:
        return epochs
    if source == "steel":
        return STEEL_EPOCHS
    return FULL_EPOCHS if data else SAMPLE_EPOCHS


def quickstart(
    data: str | None,
    out: Path,
    epochs: int | None = None,
    source: str = "neu-seg",
    build_options: dict | None = None,
) -> dict:
    """Run the whole backbone once and print where everything landed."""
    ensure_ray()
    out = Path(out).resolve()
    cfg = _build_config(source, data, out, build_options or {})
    epochs = _epochs(source, data, epochs)
    dataset, run = out / "dataset", out / "run"
    print(f"[1/3] building Parquet from {cfg.root}")
    build_parquet(cfg, dataset, overwrite=True)
    print(f"[2/3] training DeepLabV3+ (resnet18, {epochs} epochs) on Ray, then its plots")
    small = source == "neu-seg" and not data
    seg = config_from_manifest(dataset, epochs=epochs, batch_size=8 if small else 16)
    seg = replace(seg, crop_size=min(seg.crop_size, crop_limit(seg)[1]))  # small images too
    plots = run_seg_training(seg, run)["plots"]
    print("[3/3] evaluating on the validation split, whole images at native size")
    metrics = evaluate_dataset_split(run, "val")
    # In the run folder, which defectforge owns: --out itself may be any folder of the user's.
    write_json_atomic(run / "eval.json", metrics)
    per_class = ", ".join(
        f"{name} {iou:.2f}" if iou is not None else f"{name} (absent)"
        for name, iou in metrics["per_class_iou"].items()
    )
    print(
        f"\nvalidation binary defect IoU {metrics['binary_defect_iou']:.4f}, mean defect IoU "
        f"{metrics['mean_defect_iou'] or 0:.4f}; per class {per_class}"
    )
    print(f"dataset: {dataset}\nmodel: {run}/model.pt (+ config.json)\nmetrics: {run}/eval.json")
    print("plots: " + ", ".join(str(p) for p in plots))
    return metrics

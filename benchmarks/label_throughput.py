"""Pseudo-labelling throughput on a Ray Data actor pool, printed as a table. Run by hand:

    python benchmarks/label_throughput.py --labeller runs/neu-dlv3p --images runs/generated
    python benchmarks/label_throughput.py ... --actors 1 --use-gpu       # one GPU per actor

Each row labels every image of ``--images`` (a `gan generate` output or an image folder) with
``--actors`` copies of the labeller, at the labeller's common train size, including the mask
corrections and PNG encoding; the clock includes actor start-up (one model load per actor).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import ray

from defectforge.datasets.contract import run_identity
from defectforge.segmentation.checkpoint import MODEL_FILE
from defectforge.segmentation.config import SegConfig
from defectforge.segmentation.pseudo_label import LabelConfig
from defectforge.trainables.runtime import ensure_ray
from defectforge.trainables.synth import common_size, generated_dataset, label_rows


def labelling_rate(cfg: LabelConfig, size: tuple[int, int]) -> tuple[int, float]:
    rows, _ = generated_dataset(Path(cfg.images))
    rows = rows.materialize()
    labeller_id = run_identity(cfg.labeller, MODEL_FILE)
    started = time.perf_counter()
    count = label_rows(cfg, rows, size, labeller_id).materialize().count()
    return count, count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labeller", required=True, help="run folder of `seg train`")
    parser.add_argument("--images", required=True)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--use-gpu", action="store_true")
    args = parser.parse_args()
    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    seg = SegConfig.load(Path(args.labeller) / "config.json")
    size = common_size(seg.data)
    print("| labeller | image size | actors | device | images | img/s |")
    print("|---|---|---|---|---|---|")
    for actors in args.actors:
        cfg = LabelConfig(
            images=args.images,
            labeller=args.labeller,
            actors=actors,
            batch_size=args.batch_size,
            use_gpu=args.use_gpu,
        )
        count, rate = labelling_rate(cfg, size)
        device = "gpu" if args.use_gpu else "cpu"
        print(
            f"| {seg.arch}/{seg.encoder} | {size[0]}x{size[1]} | {actors} | {device} | {count} "
            f"| {rate:.1f} |"
        )


if __name__ == "__main__":
    main()

"""Pseudo-labelling throughput on a Ray Data actor pool, printed as a table. Run by hand:

    python benchmarks/label_throughput.py --labeller runs/neu-dlv3p --images runs/generated
    python benchmarks/label_throughput.py ... --actors 1 --use-gpu       # one GPU per actor

Each actor count labels the first N images of ``--images`` (a `gan generate` output or an image
folder) for each N of ``--counts``, at the labeller's common train size and the pipeline's batch
size, mask corrections and PNG encoding included. The clock runs from the start of the labelling
to the last labelled row: it holds a fixed cost (actor start-up, one model load each, and the
pool's first and last blocks) and a per-image cost. Two counts separate them: the marginal rate
is (N2 - N1) / (t2 - t1), the fixed cost what is left of t1. Ratios to one actor are in the
same run.
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

# What `synth label` and a pipeline's label stage use unless told otherwise.
PIPELINE_BATCH = LabelConfig.__dataclass_fields__["batch_size"].default


def labelling_seconds(cfg: LabelConfig, size: tuple[int, int], count: int) -> float:
    rows, _, _ = generated_dataset(Path(cfg.images))
    rows = rows.limit(count).materialize()
    labeller_id = run_identity(cfg.labeller, MODEL_FILE)
    started = time.perf_counter()
    labelled = label_rows(cfg, rows, size, labeller_id).materialize().count()
    if labelled != count:
        raise SystemExit(f"--images holds {labelled} images, fewer than --counts {count}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labeller", required=True, help="run folder of `seg train`")
    parser.add_argument("--images", required=True)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--counts", type=int, nargs=2, default=[128, 384], metavar=("N1", "N2"))
    parser.add_argument("--batch-size", type=int, default=PIPELINE_BATCH)
    parser.add_argument("--use-gpu", action="store_true")
    args = parser.parse_args()
    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    seg = SegConfig.load(Path(args.labeller) / "config.json")
    size = common_size(seg.data)
    small, large = sorted(args.counts)
    print(
        f"| labeller | image size | batch | actors | device | s for {small} | s for {large} "
        f"| img/s overall ({large}) | marginal img/s | fixed s | marginal vs 1 actor |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    single = None
    for actors in args.actors:
        cfg = LabelConfig(
            images=args.images,
            labeller=args.labeller,
            actors=actors,
            batch_size=args.batch_size,
            use_gpu=args.use_gpu,
        )
        t_small, t_large = (labelling_seconds(cfg, size, n) for n in (small, large))
        marginal = (large - small) / (t_large - t_small)
        single = single or (marginal if actors == 1 else None)
        ratio = f"{marginal / single:.2f}x" if single else "-"
        device = "gpu" if args.use_gpu else "cpu"
        print(
            f"| {seg.arch}/{seg.encoder} | {size[0]}x{size[1]} | {args.batch_size} | {actors} | "
            f"{device} | {t_small:.1f} | {t_large:.1f} | {large / t_large:.1f} | "
            f"{marginal:.1f} | {t_small - small / marginal:.1f} | {ratio} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

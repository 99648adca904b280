"""Training throughput: the full Ray path vs a plain in-memory torch loop, same model and batch.

Ray path: Parquet -> Ray Data shard -> decode + augmentation + crop -> model, inside Ray Train,
timed by the loop itself over one epoch's training steps (validation excluded).
Plain loop: images decoded into memory once, a torch DataLoader doing the same augmentation and
crop with albumentations, the same model, loss and optimiser.

Run by hand (it takes a few minutes and wants the machine to itself):

    python benchmarks/seg_throughput.py --data runs/neu --steps 100 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from defectforge.datasets.augment import augment_pair, paper_augmentation  # noqa: E402
from defectforge.datasets.batches import normalise, random_crop  # noqa: E402
from defectforge.datasets.contract import decode_png, split_dir  # noqa: E402
from defectforge.segmentation.config import SegConfig  # noqa: E402
from defectforge.segmentation.losses import CombinedLoss  # noqa: E402
from defectforge.segmentation.models import build_model  # noqa: E402

WARMUP_STEPS = 3


class InMemoryPairs(Dataset):
    def __init__(self, cfg: SegConfig):
        table = pq.read_table(split_dir(cfg.data, "train"), columns=["image", "mask"])
        self.images = [decode_png(c, cfg.channels) for c in table["image"].to_pylist()]
        self.masks = [decode_png(c, 0) for c in table["mask"].to_pylist()]
        self.cfg = cfg
        self.augment = paper_augmentation(cfg.aug_strength)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image, mask = augment_pair(self.augment, self.images[index], self.masks[index])
        if self.cfg.crop_size:
            image, mask = random_crop(image, mask, self.cfg.crop_size, np.random.default_rng())
        x = normalise(image[None], self.cfg.batch_spec())[0]
        return torch.from_numpy(x), torch.from_numpy(mask.astype(np.int64))


def plain_loop(cfg: SegConfig, steps: int) -> float:
    torch.set_num_threads(os.cpu_count() or 1)
    model = build_model(cfg.arch, cfg.encoder, cfg.channels, cfg.num_classes).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    criterion = CombinedLoss(cfg.loss, cfg.tversky_alpha, cfg.focal_gamma)
    loader = DataLoader(
        InMemoryPairs(cfg),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=1,
        persistent_workers=True,
    )
    done, started = 0, None
    while done < steps + WARMUP_STEPS:
        for images, masks in loader:
            if done == WARMUP_STEPS:
                started = time.perf_counter()
            loss = criterion(model(images), masks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done >= steps + WARMUP_STEPS:
                break
    return steps * cfg.batch_size / (time.perf_counter() - started)


def ray_path(cfg: SegConfig, out: str) -> float:
    from defectforge.trainables.seg import run_seg_training

    summary = run_seg_training(cfg, out)
    return summary["history"][-1]["train_img_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a built dataset (defectforge data build)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--repeats", type=int, default=3, choices=range(1, 11), help="runs of each path (1-10)"
    )
    parser.add_argument("--arch", default="deeplabv3plus")
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from defectforge.trainables.runtime import ensure_ray
    from defectforge.trainables.seg import config_from_manifest

    cfg = config_from_manifest(
        args.data,
        arch=args.arch,
        crop_size=args.crop_size,
        batch_size=args.batch_size,
        epochs=1,
        max_steps_per_epoch=args.steps,
    )
    # Alternating the two paths spreads any drift of the machine over both; Ray is up before
    # the first plain run, so every plain run has its idle processes beside it as the others do.
    ensure_ray()
    rates: dict[str, list[float]] = {"plain": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="bench-seg-") as runs:
        for repeat in range(args.repeats):
            rates["plain"].append(plain_loop(cfg, args.steps))
            rates["ray"].append(ray_path(cfg, f"{runs}/{repeat}"))
    plain = statistics.median(rates["plain"])
    print("\n| path | model | crop | batch | steps | img/s per repeat | median | vs plain |")
    print("|---|---|---|---|---|---|---|---|")
    for name, key in (
        ("plain in-memory DataLoader", "plain"),
        ("Parquet -> Ray Data -> Ray Train", "ray"),
    ):
        each = ", ".join(f"{rate:.1f}" for rate in rates[key])
        median = statistics.median(rates[key])
        print(
            f"| {name} | {cfg.arch}/{cfg.encoder} | {cfg.crop_size} | {cfg.batch_size} | "
            f"{args.steps} | {each} | {median:.1f} | {median / plain:.0%} |"
        )


if __name__ == "__main__":
    main()

"""Training throughput: the full Ray path vs a plain in-memory torch loop, same model and batch.

Ray path: Parquet -> Ray Data -> decode + augmentation + crop -> model, as ``seg train`` runs one
worker (``run_seg_training``: the loop in one Ray task, as a one-worker study trial trains too),
timed by the loop itself over one epoch's training steps (validation excluded). Its rows are
read once and replayed from memory when they fit (``datasets.replay``, the default: "memory"),
or streamed as a Ray Data pass per epoch ("stream", forced here by a zero cache limit).
"train": the same loop and in-memory feed inside a one-worker Ray Train run, as several
workers train (and as one worker did before).
Plain loop: images decoded into memory once, a torch DataLoader doing the same augmentation and
crop with albumentations, the same model, loss and optimiser.

Run by hand (it takes a few minutes and wants the machine to itself):

    python benchmarks/seg_throughput.py --data runs/neu --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from defectforge.datasets.augment import augment_pair, paper_augmentation  # noqa: E402
from defectforge.datasets.batches import normalise, random_crop  # noqa: E402
from defectforge.datasets.contract import decode_png, read_split_table  # noqa: E402
from defectforge.segmentation.config import SegConfig  # noqa: E402
from defectforge.segmentation.losses import CombinedLoss  # noqa: E402
from defectforge.segmentation.models import build_model  # noqa: E402


class InMemoryPairs(Dataset):
    def __init__(self, cfg: SegConfig):
        table = read_split_table(cfg.data, "train", columns=["image", "mask"])
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


FEEDS = {
    "memory": "seg train, one worker (memory)",
    "stream": "seg train, one worker (stream)",
    "train": "Ray Train run of one worker (memory)",
}


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
    # The clock starts when the first batch arrives, as the training loop's own does (its
    # train_img_per_s): the first steps' warm-up counts on both sides.
    done, started = 0, None
    while done < steps:
        for images, masks in loader:
            started = started or time.perf_counter()
            loss = criterion(model(images), masks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done >= steps:
                break
    return steps * cfg.batch_size / (time.perf_counter() - started)


def ray_train_path(cfg: SegConfig, out: str) -> tuple[float, float]:
    """The loop inside a one-worker Ray Train run (what ``seg train`` runs for several)."""
    from defectforge.trainables.runtime import fit, worker_cpus
    from defectforge.trainables.seg import make_trainer

    trainer = make_trainer(cfg, out, "train", resources_per_worker={"CPU": worker_cpus(1)})
    epoch = fit(trainer).metrics
    return epoch["train_img_per_s"], epoch["epoch_seconds"]


def seg_train_path(cfg: SegConfig, out: str, feed: str) -> tuple[float, float]:
    """(img/s over the timed steps, seconds of the epoch's training and validation)."""
    from defectforge.datasets import replay
    from defectforge.trainables.seg import run_seg_training

    limit = replay.CACHED_SPLIT_BYTES
    replay.CACHED_SPLIT_BYTES = limit if feed == "memory" else 0
    try:
        epoch = run_seg_training(cfg, out)["history"][-1]
    finally:
        replay.CACHED_SPLIT_BYTES = limit
    return epoch["train_img_per_s"], epoch["epoch_seconds"]


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
    parser.add_argument(
        "--feeds",
        nargs="+",
        default=list(FEEDS),
        choices=list(FEEDS),
        help="the Ray path's feeds to run",
    )
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
    # Alternating the paths spreads any drift of the machine over all; Ray is up before the
    # first plain run, so every plain run has its idle processes beside it as the others do.
    ensure_ray()
    paths = {"plain": "plain in-memory DataLoader"}
    paths.update({feed: FEEDS[feed] for feed in args.feeds})
    rates: dict[str, list[float]] = {key: [] for key in paths}
    epoch_seconds: dict[str, list[float]] = {key: [] for key in args.feeds}
    with tempfile.TemporaryDirectory(prefix="bench-seg-") as runs:
        for repeat in range(args.repeats):
            rates["plain"].append(plain_loop(cfg, args.steps))
            for feed in args.feeds:
                run = f"{runs}/{feed}-{repeat}"
                if feed == "train":
                    rate, seconds = ray_train_path(cfg, run)
                else:
                    rate, seconds = seg_train_path(cfg, run, feed)
                rates[feed].append(rate)
                epoch_seconds[feed].append(seconds)
    plain = statistics.median(rates["plain"])
    print(
        "\n| path | model | crop | batch | steps | img/s per repeat | median | vs plain "
        "| epoch s (median, train + val) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key, name in paths.items():
        each = ", ".join(f"{rate:.1f}" for rate in rates[key])
        median = statistics.median(rates[key])
        seconds = f"{statistics.median(epoch_seconds[key]):.1f}" if key in epoch_seconds else "-"
        print(
            f"| {name} | {cfg.arch}/{cfg.encoder} | {cfg.crop_size} | {cfg.batch_size} | "
            f"{args.steps} | {each} | {median:.1f} | {median / plain:.0%} | {seconds} |"
        )


if __name__ == "__main__":
    main()

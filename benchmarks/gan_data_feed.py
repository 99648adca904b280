"""How fast a GAN worker's real batches arrive: a new Ray Data pass every epoch (the only way
before) vs the first pass kept in memory and replayed (what `gan train` does when the train
split's encoded images fit in ``replay.CACHED_SPLIT_BYTES``). A GPU takes real images faster
than 2 cores make them, so on a few-shot set the feed, not the networks, can set the pace. Decoding and native cropping are in both rows.

Run by hand, alone on the machine, on a built dataset (e.g. a `data subset` of 163 images):

    python benchmarks/gan_data_feed.py --data runs/neu163 --batches 300 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from defectforge.datasets.batches import GanBatchMaker  # noqa: E402
from defectforge.trainables import gan  # noqa: E402


def feed_rate(data: str, batches: int, resolution: int, batch_size: int, replay: bool) -> float:
    """Images per second over ``batches`` batches after the first one (the stream's start-up)."""
    cfg = gan.gan_config_from_manifest(
        data, resolution=resolution, batch_size=batch_size, native_crops=True
    )
    maker = GanBatchMaker(cfg.channels, resolution, crop_seed=0)
    feed = gan._endless(gan.real_images(cfg), cfg, maker, replay)
    next(feed)
    started = time.perf_counter()
    for _ in range(batches):
        next(feed)
    return batches * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a built dataset (`data build`)")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=64, help="native crops of this side")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rates = {
        replay: [
            feed_rate(args.data, args.batches, args.resolution, args.batch_size, replay)
            for _ in range(args.repeats)
        ]
        for replay in (False, True)
    }
    streamed = statistics.median(rates[False])
    print(f"\n{args.batches} batches of {args.batch_size}, {args.resolution}-px native crops")
    print("| feed | img/s (median) | runs | vs a pass per epoch |")
    print("|---|---|---|---|")
    for replay, label in ((False, "a Ray Data pass per epoch"), (True, "first pass replayed")):
        median = statistics.median(rates[replay])
        runs = ", ".join(f"{rate:.0f}" for rate in rates[replay])
        print(f"| {label} | {median:.0f} | {runs} | {median / streamed:.2f}x |")


if __name__ == "__main__":
    main()

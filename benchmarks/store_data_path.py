"""The segmentation data path reading its Parquet from object storage vs from a local disk.

The same built dataset is uploaded to a real S3-compatible server on this machine (SeaweedFS,
the tests' launcher) and `seg train` runs one worker on each copy, alternating, with the split
streamed by Ray Data every epoch ("stream": the path that reads the store most) and replayed from
memory ("memory": the default). Reported: training img/s over the timed steps and the epoch's
seconds (reading, training and validation), and the store's share of the disk's rate. A local
server measures the store's code path (pyarrow's S3 client, Ray Data over it), not a network.

Run by hand, with the machine to itself:

    python benchmarks/store_data_path.py --data runs/neu --steps 40 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from s3server import start_s3_server  # noqa: E402
from seg_throughput import seg_train_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a built dataset (defectforge data build)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3, choices=range(1, 11))
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        server = start_s3_server(Path(tmp) / "s3")
        try:
            os.environ.update(server.env)  # before Ray starts: its workers read the store too
            from defectforge.core.storage import Location
            from defectforge.trainables.runtime import ensure_ray
            from defectforge.trainables.seg import config_from_manifest

            stored = Location.of(server.make_bucket("bench")) / "data"
            stored.upload(Location.of(args.data).local, last="manifest.json")
            ensure_ray()
            local = config_from_manifest(
                args.data,
                crop_size=args.crop_size,
                batch_size=args.batch_size,
                epochs=1,
                max_steps_per_epoch=args.steps,
            )
            sources = {
                "local disk": local,
                "S3 (SeaweedFS, 127.0.0.1)": replace(local, data=stored.uri),
            }
            rates = {(s, f): [] for s in sources for f in ("stream", "memory")}
            seconds = {key: [] for key in rates}
            for repeat in range(args.repeats):
                for source, cfg in sources.items():
                    for feed in ("stream", "memory"):
                        run = f"{tmp}/{source[:2]}-{feed}-{repeat}"
                        rate, epoch = seg_train_path(cfg, run, feed)
                        rates[source, feed].append(rate)
                        seconds[source, feed].append(epoch)
        finally:
            server.stop()

    print("\n| data on | feed | img/s per repeat | median | vs local | epoch s (median) |")
    print("|---|---|---|---|---|---|")
    for (source, feed), each in rates.items():
        median = statistics.median(each)
        base = statistics.median(rates["local disk", feed])
        print(
            f"| {source} | {feed} | {', '.join(f'{r:.1f}' for r in each)} | {median:.1f} | "
            f"{median / base:.0%} | {statistics.median(seconds[source, feed]):.1f} |"
        )


if __name__ == "__main__":
    main()

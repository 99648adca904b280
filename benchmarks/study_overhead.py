"""Study overhead: wall time vs the trials' own training time, one-worker trials run in their
Tune process (the default) vs as a Ray Train run each (the way every trial ran before).

Each mode runs the same grid study of N trials on the bundled NEU-Seg sample (or --data), one
trial at a time. "trial s" is the time the trials spent in epochs (training and validation,
summed from trials.json); the rest of the wall time is overhead: starting Ray work, data streams,
checkpoints, Tune. "first epoch after" is how long after `study run` started the first trial's
first epoch began; "at 2-min trials" is the overhead per trial as a share of a trial that trains
for 2 minutes (the issue's yardstick). Run by hand, alone on the machine:

    python benchmarks/study_overhead.py --trials 4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import yaml  # noqa: E402

SAMPLE = Path(__file__).resolve().parent.parent / "datasets" / "sample" / "neu-seg"


def _dataset(folder: Path, data: str) -> str:
    from defectforge.datasets.build import BuildConfig
    from defectforge.trainables.data_jobs import build_parquet

    if data:
        return data
    out = folder / "sample"
    build_parquet(BuildConfig(source="neu-seg", root=str(SAMPLE), test_fraction=0.3), out)
    return str(out)


def _spec(data: str, storage: Path, trials: int, steps: int, in_process: bool) -> dict:
    return {
        "name": "in-process" if in_process else "ray-train",
        "dataset": {"real": data},
        "search_space": {"seed": list(range(trials)), "epochs": 2, "batch_size": 4},
        "search": {"algorithm": "grid"},
        "training": {"max_steps_per_epoch": steps, "crop_size": 128},
        "resources": {"cpus_per_trial": 1, "one_worker_in_process": in_process},
        "storage_path": str(storage),
        "final": {"seeds": 0},
    }


def _first_epoch_start(root: Path) -> float:
    """When the earliest trial's first epoch began (epoch end minus its duration)."""
    starts = []
    for result in root.glob("search/*/result.json"):
        first = json.loads(result.read_text().splitlines()[0])
        starts.append(first["timestamp"] - first["epoch_seconds"])
    return min(starts)


def measure(folder: Path, data: str, trials: int, steps: int, in_process: bool) -> dict:
    from defectforge.trainables.study import run_study

    spec = _spec(data, folder / "studies", trials, steps, in_process)
    spec_file = folder / f"{spec['name']}.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    started = time.time()
    run_study(spec_file)
    wall = time.time() - started
    root = folder / "studies" / spec["name"]
    trial_seconds = sum(t["seconds"] for t in json.loads((root / "trials.json").read_text()))
    return {
        "mode": spec["name"],
        "trials": trials,
        "wall": wall,
        "trial": trial_seconds,
        "first": _first_epoch_start(root) - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="training steps per epoch")
    parser.add_argument("--data", default="", help="a built dataset with a val split")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="study-overhead-") as scratch:
        folder = Path(scratch)
        data = _dataset(folder, args.data)
        rows = [measure(folder, data, args.trials, args.steps, mode) for mode in (False, True)]
    baseline = rows[0]
    print(
        f"\n{args.trials} trials x 2 epochs of {args.steps} steps, one at a time, {os.cpu_count()} CPUs"
    )
    print(
        "| mode | wall s | trial s | overhead s/trial | overhead % | at 2-min trials % "
        "| first epoch after s | wall vs ray-train |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        overhead = row["wall"] - row["trial"]
        per_trial = overhead / row["trials"]
        print(
            f"| {row['mode']} | {row['wall']:.1f} | {row['trial']:.1f} | "
            f"{per_trial:.1f} | {100 * overhead / row['wall']:.0f} | "
            f"{100 * per_trial / (per_trial + 120):.0f} | "
            f"{row['first']:.1f} | {row['wall'] / baseline['wall']:.2f}x |"
        )


if __name__ == "__main__":
    main()

"""``defectforge gan``: train, generate, compare, metrics."""

from __future__ import annotations

import argparse
import json

from defectforge.cli.options import (
    absolute_path,
    add_options,
    add_out,
    add_tracking,
    continue_hint,
    given,
    local_path,
    tracking_of,
)

COMMANDS = {"gan": "StyleGAN2 + DiffAugment: train, generate, compare, metrics"}
# The columns of `gan metrics --every-snapshot`'s table, where the run has them.
SNAPSHOT_COLUMNS = ("swd", "swd_defect", "defect_share", "drawn_share", "drawn_agreement")


def build(name: str, parser) -> None:
    from defectforge.gan.config import PROFILES, GanConfig, GenerateConfig

    sub = parser.add_subparsers(dest="gan_command", required=True)
    train = sub.add_parser("train", help="train on a Parquet dataset with Ray Train")
    train.add_argument("--data", required=True, type=absolute_path, help="dataset (`data build`)")
    train.add_argument("--out", required=True, type=absolute_path, help="run folder")
    train.add_argument(
        "--profile",
        default="cpu-small",
        choices=sorted(PROFILES),
        help="network size and defaults: cpu-small (minutes on CPUs) or gpu (default: cpu-small)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest snapshot up to --kimg",
    )
    add_options(train, GanConfig, profiles={"gpu": PROFILES["gpu"]})
    add_tracking(train)
    generate = sub.add_parser("generate", help="images by seed -> PNGs + Parquet rows")
    generate.add_argument("--model", required=True, type=absolute_path, help="run of `gan train`")
    add_out(generate)
    add_options(generate, GenerateConfig)
    generate.add_argument(
        "--seeds", help="comma-separated seeds or a range a-b (in place of --count/--first-seed)"
    )
    compare = sub.add_parser(
        "compare", help="runs side by side: SWD curves and sample grids at one kimg (PNGs)"
    )
    compare.add_argument("runs", nargs="+", type=absolute_path, help="`gan train` run folders")
    compare.add_argument("--labels", help="comma-separated names (default: the folder names)")
    compare.add_argument("--kimg", type=float, required=True, help="kimg of the sample grids")
    add_out(compare, "folder to publish the PNGs and comparison.json in")
    metrics = sub.add_parser("metrics", help="sliced Wasserstein distance to real images")
    metrics.add_argument("--model", required=True, type=absolute_path)
    metrics.add_argument(
        "--data", type=absolute_path, help="dataset to compare with (default: the training data)"
    )
    metrics.add_argument(
        "--n", type=_image_count, help="images per set (default: the run's metric_images)"
    )
    metrics.add_argument(
        "--inception", type=local_path, help="local torchvision inception_v3 weights: FID/KID"
    )
    metrics.add_argument(
        "--class",
        dest="class_name",
        help="score one class (default: all, a conditional G's in turn)",
    )
    metrics.add_argument(
        "--every-snapshot",
        action="store_true",
        help="score every snapshot the run kept: RUN/snapshot_metrics.json and RUN/plots",
    )


def _image_count(text: str) -> int:
    count = int(text) if text.strip().lstrip("-").isdigit() else 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of images, 1 or more")
    return count


def parse_seeds(text: str | None, cfg) -> list[int]:
    """``--seeds`` as a list, or the config's count of seeds from its first."""
    from defectforge.core.errors import ConfigError

    if not text:
        return cfg.seeds()
    try:
        if "-" in text and "," not in text:
            first, last = (int(x) for x in text.split("-"))
        else:
            seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give seeds as 0,5,9 or a range 0-99") from None
    if "-" in text and "," not in text:
        if first > last:
            raise ConfigError(f"--seeds {text!r}: a range goes up, e.g. {last}-{first}")
        seeds = list(range(first, last + 1))
    if any(seed < 0 or seed >= 2**32 for seed in seeds):
        raise ConfigError(f"--seeds {text!r}: seeds are whole numbers from 0 to 2^32 - 1")
    if len(set(seeds)) < len(seeds):
        # One seed is one image: a repeat would be a row twice under one id.
        repeated = next(seed for index, seed in enumerate(seeds) if seed in seeds[:index])
        raise ConfigError(f"--seeds {text!r}: seed {repeated} is given twice; give each once")
    return seeds


def refuse_seeds_beside_count(seeds: str | None, options: dict) -> None:
    """``--seeds`` names every seed; a ``--count``/``--first-seed`` beside it would be ignored."""
    from defectforge.core.errors import ConfigError

    both = [name for name in ("count", "first_seed") if name in options]
    if seeds and both:
        flag = "--" + both[0].replace("_", "-")
        raise ConfigError(
            f"--seeds {seeds!r} with {flag}: --seeds names every seed, so {flag} would be "
            f"ignored; give --seeds alone, or {flag} without --seeds"
        )


def run(args) -> None:
    from defectforge.gan.config import GanConfig, GenerateConfig
    from defectforge.trainables import gan, gan_samples

    if args.gan_command == "train":
        tracking = tracking_of(args)
        cfg = gan.gan_config_from_manifest(args.data, args.profile, **given(args, GanConfig))
        summary = gan.run_gan_training(cfg, args.out, resume=args.resume, tracking=tracking)
        final, best = summary["final"], summary["best"]
        print(
            f"kimg {final['kimg']:g}: SWD {final.get('swd', float('nan')):.1f}; published the "
            f"lowest-SWD snapshot (kimg {best['kimg']:g}, SWD {best['swd']:.1f}) with metrics "
            f"and sample grids in {args.out}"
        )
    elif args.gan_command == "compare":
        _compare(args)
    elif args.gan_command == "generate":
        options = given(args, GenerateConfig)
        refuse_seeds_beside_count(args.seeds, options)
        cfg = GenerateConfig(**options)
        seeds = parse_seeds(args.seeds, cfg)
        manifest = gan_samples.write_generated(
            args.model, args.out, seeds, cfg.truncation, cfg.class_name, args.overwrite
        )
        written = manifest.split_total("train")
        drawn = " with the masks the generator drew" if manifest.masks else ""
        left_out = len(seeds) - written
        note = f"; {left_out} sample(s) without a defect pixel left out" if left_out else ""
        print(f"wrote {written} images{drawn} (PNG + Parquet) to {args.out}{note}")
    elif args.every_snapshot:
        _refuse_other_measures(args)
        rows = gan_samples.every_snapshot_metrics(args.model, args.n or 0)
        keys = [k for k in SNAPSHOT_COLUMNS if k in rows[-1]]
        print("| kimg | " + " | ".join(keys) + " |")
        print("|---" * (len(keys) + 1) + "|")
        for row in rows:
            print(f"| {row['kimg']:g} | " + " | ".join(f"{row[k]:.3g}" for k in keys) + " |")
        print(f"plots: {args.model}/plots; figures: {args.model}/snapshot_metrics.json")
    else:
        result = gan_samples.generator_metrics(
            args.model, args.data, args.n or 0, args.inception, args.class_name
        )
        print(json.dumps(result))


def _refuse_other_measures(args) -> None:
    """--every-snapshot writes the run's own history (its data, every class, SWD): options that
    would score something else are refused, not dropped."""
    from defectforge.core.errors import ConfigError

    given = [
        flag
        for flag, value in (
            ("--data", args.data),
            ("--class", args.class_name),
            ("--inception", args.inception),
        )
        if value
    ]
    if given:
        raise ConfigError(
            f"{given[0]} with --every-snapshot: every snapshot is scored as the run's own history "
            "(its training data, every class, SWD); score one snapshot with "
            f"`gan metrics --model RUN/snapshots/kimg_... {given[0]} ...` instead"
        )


def _compare(args) -> None:
    from defectforge.core.errors import ConfigError
    from defectforge.core.storage import Location
    from defectforge.gan.report import CURVES_FILE, write_comparison

    labels = args.labels.split(",") if args.labels else [Location.of(r).name for r in args.runs]
    if len(labels) != len(args.runs) or len(set(labels)) != len(labels):
        raise ConfigError(f"--labels: give {len(args.runs)} different names, one per run")
    runs = dict(zip(labels, args.runs, strict=True))
    rows = write_comparison(runs, args.out, args.kimg, args.overwrite)
    print(f"| run | SWD x1e3 at kimg {args.kimg:g} | lowest SWD (kimg) |")
    print("|---|---|---|")
    for row in rows:
        at = "-" if row["swd_at_kimg"] is None else f"{row['swd_at_kimg']:.1f}"
        print(f"| {row['run']} | {at} | {row['lowest_swd']:.1f} ({row['lowest_at_kimg']:g}) |")
    print(f"plots: {args.out}/{CURVES_FILE}, {args.out}/samples_kimg{args.kimg:g}.png")


def interrupted_hint(args) -> str:
    if args.gan_command == "train":
        return continue_hint(args.out, "snapshot")
    return "nothing was published under --out; run the command again"

"""``defectforge data``: build, simulate, augment and mix datasets."""

from __future__ import annotations

import sys

from defectforge.cli.options import absolute_path, add_options, add_out, given

COMMANDS = {"data": "build, simulate, subset, augment and mix Parquet datasets"}
MIX_AUGMENT = "augment-"


def build(name: str, parser) -> None:
    from defectforge.datasets.augment import AugmentConfig
    from defectforge.datasets.build import BuildConfig
    from defectforge.datasets.mix import MixConfig
    from defectforge.datasets.steel import SteelOptions
    from defectforge.datasets.steel_sim import SimulationConfig
    from defectforge.datasets.subset import SubsetConfig

    data = parser.add_subparsers(dest="data_command", required=True)
    builder = data.add_parser("build", help="raw folder -> Parquet dataset + manifest.json")
    add_options(builder, BuildConfig)
    add_options(builder, SteelOptions)
    add_out(builder)
    simulate = data.add_parser(
        "simulate-steel",
        help="render simulated galvanized steel under K lights (a stand-in, not real data)",
    )
    add_options(simulate, SimulationConfig)
    add_out(simulate, "folder of sample folders to write")
    subset = data.add_parser(
        "subset", help="few-shot subset: N train images, stratified by defect class, seeded"
    )
    subset.add_argument("--data", required=True, type=absolute_path, help="dataset to draw from")
    add_options(subset, SubsetConfig)
    add_out(subset)
    augment = data.add_parser("augment", help="offline k-fold paper augmentation of train")
    augment.add_argument("--data", required=True, type=absolute_path, help="dataset to expand")
    add_options(augment, AugmentConfig)
    add_out(augment)
    mix = data.add_parser("mix", help="real + labelled synthetic train rows at a synthetic ratio")
    mix.add_argument(
        "--real", required=True, type=absolute_path, help="real dataset (`data build`)"
    )
    add_options(mix, MixConfig, required=("synthetic",))
    add_options(mix, AugmentConfig, skip=("seed",), prefix=MIX_AUGMENT, defaults={"factor": 1})
    add_out(mix)


def run(args) -> None:
    from defectforge.datasets.augment import AugmentConfig
    from defectforge.datasets.build import BuildConfig, empty_folder_classes, missing_splits
    from defectforge.datasets.steel import SteelOptions
    from defectforge.datasets.twins import twins_warning
    from defectforge.trainables.data_jobs import augment_parquet, build_parquet, mix_datasets

    if args.data_command == "simulate-steel":
        _simulate_steel(args)
        return
    if args.data_command == "build":
        cfg = BuildConfig(
            **given(args, BuildConfig), steel=SteelOptions(**given(args, SteelOptions))
        )
        manifest = build_parquet(cfg, args.out, args.overwrite)
        warnings = (
            missing_splits(manifest, cfg),
            empty_folder_classes(manifest, cfg),
            twins_warning(manifest.twins),
        )
        for warning in warnings:
            if warning:
                print(f"defectforge: warning: {args.out}: {warning}", file=sys.stderr)
    elif args.data_command == "subset":
        from defectforge.datasets.subset import SubsetConfig, subset_dataset

        manifest = subset_dataset(
            args.data, args.out, SubsetConfig(**given(args, SubsetConfig)), args.overwrite
        )
    elif args.data_command == "augment":
        manifest = augment_parquet(
            args.data, args.out, AugmentConfig(**given(args, AugmentConfig)), args.overwrite
        )
    else:
        manifest = _mix(args, mix_datasets)
    counts = {split: c.total for split, c in manifest.counts.items()}
    print(
        f"wrote {args.out}: {counts} rows, classes {list(manifest.classes)}, "
        f"{manifest.rejected} rejected"
    )


def _mix(args, mix_datasets):
    from defectforge.datasets.augment import AugmentConfig
    from defectforge.datasets.mix import MixConfig

    cfg = MixConfig(**given(args, MixConfig))
    options = {"factor": 1, **given(args, AugmentConfig, MIX_AUGMENT)}
    augment = AugmentConfig(**options, seed=cfg.seed) if options["factor"] > 1 else None
    manifest = mix_datasets(args.real, cfg.synthetic, cfg, args.out, augment, args.overwrite)
    mix = manifest.mix
    print(
        f"train: {mix.real_images} real + {mix.synthetic_images} synthetic, ratio "
        f"{mix.achieved_ratio:.4f} (requested {mix.requested_ratio})"
    )
    return manifest


def _simulate_steel(args) -> None:
    from defectforge.datasets.steel import write_preview, write_simulation
    from defectforge.datasets.steel_sim import SimulationConfig

    cfg = SimulationConfig(**given(args, SimulationConfig))
    summary = write_simulation(cfg, args.out, args.overwrite)
    preview = write_preview(args.out, f"{args.out}/preview.png")
    print(
        f"wrote {cfg.n} simulated sheets ({cfg.lights} lights, {cfg.size} px) to {args.out}: "
        f"defects drawn {summary['defects_drawn']}, {summary['defect_free_sheets']} defect-free; "
        f"preview {preview}"
    )


def interrupted_hint(args) -> str:
    return "nothing was published under --out; run the command again"

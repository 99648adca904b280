"""``defectforge quickstart``: build, train and evaluate in one command, on a local Ray."""

from __future__ import annotations

from defectforge.cli.options import absolute_path, add_options, given, local_path

# BuildConfig fields quickstart declares itself (--source, and --data for the root).
QUICKSTART_OWNS = ("source", "root")

COMMANDS = {
    "quickstart": "build, train and evaluate on the bundled NEU-Seg sample (or your data) locally"
}


def build(name: str, quick) -> None:
    from defectforge.datasets.build import BuildConfig

    quick.add_argument(
        "--source",
        choices=("neu-seg", "steel", "folder"),
        default="neu-seg",
        help="neu-seg (default), steel (rig output or a simulation), folder (your images+masks)",
    )
    quick.add_argument(
        "--data",
        type=local_path,
        help="the source's root (default: the bundled NEU-Seg sample; for steel, a simulated "
        "stand-in rendered on the spot; required for folder)",
    )
    quick.add_argument(
        "--out", type=absolute_path, default="runs/quickstart", help="(default: runs/quickstart)"
    )
    quick.add_argument("--epochs", type=int, help="(default: 12 on the sample, 5 or 8 otherwise)")
    build = quick.add_argument_group("build options (as for `data build`)")
    add_options(build, BuildConfig, skip=QUICKSTART_OWNS)


def run(args) -> None:
    from defectforge.datasets.build import BuildConfig
    from defectforge.trainables.quickstart import quickstart

    options = given(args, BuildConfig, skip=QUICKSTART_OWNS)
    quickstart(args.data, args.out, args.epochs, args.source, options)


def interrupted_hint(args) -> str:
    return "run it again (the dataset is rebuilt, training continues from its last checkpoint)"

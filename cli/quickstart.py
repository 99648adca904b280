"""``defectforge quickstart``: build, train and evaluate in one command, on a local Ray."""

from __future__ import annotations

from defectforge.cli.options import absolute_path, add_options, given, local_path

# quickstart's --data is the build's root.
QUICKSTART_OWNS = ("root",)
QUICKSTART_DEFAULTS = {"source": "neu-seg"}

COMMANDS = {
    "quickstart": "build, train and evaluate on the bundled NEU-Seg sample (or your data) locally"
}


def build(name: str, quick) -> None:
    from defectforge.datasets.build import BuildConfig
    from defectforge.segmentation.config import SegConfig

    quick.add_argument(
        "--data",
        type=local_path,
        help="the source's root (default: the bundled NEU-Seg sample; for steel, a simulated "
        "stand-in rendered on the spot; required for folder)",
    )
    quick.add_argument(
        "--out", type=absolute_path, default="runs/quickstart", help="(default: runs/quickstart)"
    )
    add_options(
        quick,
        SegConfig,
        only=("epochs",),
        defaults={"epochs": "12 on the sample, 5 or 8 otherwise"},
    )
    build = quick.add_argument_group("build options (as for `data build`)")
    add_options(build, BuildConfig, skip=QUICKSTART_OWNS, defaults=QUICKSTART_DEFAULTS)


def build_options(args) -> tuple[str, dict]:
    """The source and the other `data build` options given (quickstart's source by default)."""
    from defectforge.datasets.build import BuildConfig

    options = {**QUICKSTART_DEFAULTS, **given(args, BuildConfig, skip=QUICKSTART_OWNS)}
    return options.pop("source"), options


def run(args) -> None:
    from defectforge.segmentation.config import SegConfig
    from defectforge.trainables.quickstart import quickstart

    source, options = build_options(args)
    epochs = given(args, SegConfig, only=("epochs",)).get("epochs")
    quickstart(args.data, args.out, epochs, source, options)


def interrupted_hint(args) -> str:
    return "run it again (the dataset is rebuilt, training continues from its last checkpoint)"

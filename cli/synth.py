"""``defectforge synth``: pseudo-label generated images; copy-paste images (the control arm);
labelled synthetic sets combined into one."""

from __future__ import annotations

import sys

from defectforge.cli.options import absolute_path, add_options, add_out, given

COMMANDS = {"synth": "pseudo-label generated images, make copy-paste ones, or combine sets"}


def build(name: str, parser) -> None:
    from defectforge.datasets.combine import CombineConfig
    from defectforge.datasets.copy_paste import CopyPasteConfig
    from defectforge.segmentation.pseudo_label import Corrections, LabelConfig

    synth = parser.add_subparsers(dest="synth_command", required=True)
    label = synth.add_parser("label", help="label generated images with a trained seg model")
    add_options(label, LabelConfig)
    add_options(label, Corrections)
    add_out(label)
    copy_paste = synth.add_parser(
        "copy-paste",
        help="defect regions of real train images pasted into others: exact masks, no GAN",
    )
    copy_paste.add_argument(
        "--real", required=True, type=absolute_path, help="real dataset (`data build`)"
    )
    add_options(copy_paste, CopyPasteConfig)
    add_out(copy_paste)
    combine = synth.add_parser(
        "combine",
        help="labelled synthetic sets as one (e.g. GAN and copy-paste images), as many rows "
        "from each",
    )
    combine.add_argument(
        "--sets",
        required=True,
        nargs="+",
        type=absolute_path,
        help="two or more labelled synthetic sets (`synth label`, `synth copy-paste`, "
        "`gan generate` of a --masks run)",
    )
    add_options(combine, CombineConfig)
    add_out(combine)


def run(args) -> None:
    if args.synth_command == "copy-paste":
        _copy_paste(args)
        return
    if args.synth_command == "combine":
        _combine(args)
        return
    from defectforge.segmentation.pseudo_label import Corrections, LabelConfig
    from defectforge.trainables.synth import label_synthetic

    cfg = LabelConfig(
        **given(args, LabelConfig), corrections=Corrections(**given(args, Corrections))
    )
    result = label_synthetic(cfg, args.out, args.overwrite)
    labelling = result["manifest"].labelling
    print(
        f"kept {labelling.kept} of {labelling.images} images (dropped: "
        f"{labelling.dropped or 'none'}); labels, report and plots in {args.out}"
    )
    if not labelling.kept:
        fix = (
            f"lower --min-confidence (now {cfg.min_confidence}; plots/confidence.png shows the "
            "labeller's confidences)"
            if "low confidence" in (labelling.dropped or {})
            else "labels.csv says why each image was dropped"
        )
        print(
            f"defectforge: warning: {args.out}: no image was kept, so it has nothing to mix; {fix}",
            file=sys.stderr,
        )
    for variant, summary in (result["quality"] or {}).items():
        print(
            f"labeller on real val, {variant}: binary defect IoU "
            f"{summary['binary_defect_iou']:.4f}, mean defect IoU {summary['mean_defect_iou']:.4f}"
        )


def _copy_paste(args) -> None:
    from defectforge.datasets.copy_paste import CopyPasteConfig, copy_paste_dataset

    cfg = CopyPasteConfig(**given(args, CopyPasteConfig))
    manifest = copy_paste_dataset(args.real, args.out, cfg, args.overwrite)
    by_class = manifest.counts["train"].by_class
    print(
        f"wrote {args.out}: {cfg.count} copy-paste images ({by_class}) from "
        f"{manifest.labelling.config['regions']} defect regions of {args.real}"
    )


def _combine(args) -> None:
    from defectforge.datasets.combine import CombineConfig, combine_synthetic

    cfg = CombineConfig(**given(args, CombineConfig))
    manifest = combine_synthetic(args.sets, args.out, cfg, args.overwrite)
    each = manifest.labelling.config["count_each"]
    print(
        f"wrote {args.out}: {each} images from each of {len(args.sets)} sets "
        f"({manifest.counts['train'].by_class})"
    )


def interrupted_hint(args) -> str:
    return "nothing was published under --out; run the command again"

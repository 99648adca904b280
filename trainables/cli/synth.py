"""``defectforge synth``: pseudo-label generated images."""

from __future__ import annotations

from defectforge.trainables.cli.options import add_options, add_out, given

COMMANDS = {"synth": "pseudo-label generated images"}


def build(name: str, parser) -> None:
    from defectforge.segmentation.pseudo_label import Corrections, LabelConfig

    synth = parser.add_subparsers(dest="synth_command", required=True)
    label = synth.add_parser("label", help="label generated images with a trained seg model")
    add_options(label, LabelConfig)
    add_options(label, Corrections)
    add_out(label)


def run(args) -> None:
    from defectforge.segmentation.pseudo_label import Corrections, LabelConfig
    from defectforge.trainables.synth import label_synthetic

    cfg = LabelConfig(
        **given(args, LabelConfig), corrections=Corrections(**given(args, Corrections))
    )
    result = label_synthetic(cfg, args.out, args.overwrite)
    labelling = result["manifest"].section("labelling")
    print(
        f"kept {labelling['kept']} of {labelling['images']} images (dropped: "
        f"{labelling['dropped'] or 'none'}); labels, report and plots in {args.out}"
    )
    for variant, summary in (result["quality"] or {}).items():
        print(
            f"labeller on real val, {variant}: binary defect IoU "
            f"{summary['binary_defect_iou']:.4f}, mean defect IoU {summary['mean_defect_iou']:.4f}"
        )


def interrupted_hint(args) -> str:
    return "nothing was published under --out; run the command again"

"""``defectforge seg`` (train, eval, export) and ``defectforge predict``."""

from __future__ import annotations

import json
from pathlib import Path

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

# `data build`'s options for reading image files and masks, which predict and eval share.
READING_OPTIONS = ("skip_bad", "max_pixels", "mask_suffix")
MASK_READING = ("binary", "mask_threshold", "mask_suffix", "missing_mask")
COMMANDS = {
    "seg": "train, evaluate and export segmentation models",
    "predict": "mask and overlay PNGs for a folder of images (a run or an export)",
}


def build(name: str, parser) -> None:
    if name == "predict":
        _build_predict(parser)
        return
    from defectforge.datasets.build import BuildConfig
    from defectforge.segmentation.config import SegConfig
    from defectforge.segmentation.decisions import CalibrationTarget

    sub = parser.add_subparsers(dest="seg_command", required=True)
    train = sub.add_parser(
        "train", help="train on a Parquet dataset on Ray (one task, or Ray Train for --workers N)"
    )
    train.add_argument("--data", required=True, type=absolute_path, help="dataset (`data build`)")
    train.add_argument("--out", required=True, type=absolute_path, help="run folder")
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --out, e.g. to more --epochs"
    )
    add_options(train, SegConfig)
    add_tracking(train)
    evaluate = sub.add_parser("eval", help="evaluate a trained model on a folder of images")
    evaluate.add_argument("--model", required=True, type=absolute_path, help="run folder")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=local_path, help="a folder of images (with --masks)")
    source.add_argument(
        "--split",
        choices=("train", "val", "test"),
        help="or a split of the dataset the run was trained on",
    )
    evaluate.add_argument("--masks", type=local_path, help="their masks (same stem)")
    add_options(evaluate, BuildConfig, only=MASK_READING)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    calibrate = sub.add_parser(
        "calibrate", help="choose the OK/NG operating point on the run's val split"
    )
    calibrate.add_argument("run", type=absolute_path, help="run folder of `seg train`")
    add_options(calibrate, CalibrationTarget)
    export = sub.add_parser("export", help="a run's model -> TorchScript + ONNX + model.json")
    export.add_argument("run", type=absolute_path, help="run folder of `seg train`")
    add_out(export, "export folder to write")


def _build_predict(predict) -> None:
    from defectforge.datasets.build import BuildConfig
    from defectforge.segmentation.decisions import OperatingPoint

    predict.add_argument(
        "--model",
        required=True,
        type=absolute_path,
        help="a run folder (seg train) or an export (seg/study export), or a model file in one",
    )
    predict.add_argument(
        "--images",
        required=True,
        type=local_path,
        help="a folder of images (its own, not its subfolders'; masks beside them left out), "
        "or one image",
    )
    add_out(predict, "folder for the masks and overlays")
    predict.add_argument(
        "--runtime",
        choices=["onnx", "torchscript"],
        help="for an export: which of its two files runs (default: onnx)",
    )
    predict.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help="for an export: where it runs (cuda: onnxruntime-gpu or torch with CUDA; "
        "default: cpu)",
    )
    predict.add_argument(
        "--heatmaps",
        action="store_true",
        help="also write each image's defect probability as a picture (<name>_heatmap.png)",
    )
    calibrated = {name: "the calibrated one" for name in ("threshold", "min_area")}
    add_options(predict, OperatingPoint, defaults=calibrated)
    add_options(predict, BuildConfig, only=READING_OPTIONS)


def _checked_given(args, cls, only: tuple[str, ...] | None = None) -> dict:
    """The options of ``cls`` given on the command line, each checked by its declaration (the
    command takes them one by one, not as a whole config)."""
    from defectforge.core.config import check_field, field_types

    specs, hints = {spec.name: spec for spec in cls.options()}, field_types(cls)
    chosen = given(args, cls, only=only)
    return {name: check_field(specs[name], value, hints[name]) for name, value in chosen.items()}


def run(args) -> None:
    if args.command == "predict":
        _predict(args)
    else:
        {"train": _train, "export": _export, "eval": _evaluate, "calibrate": _calibrate}[
            args.seg_command
        ](args)


def _train(args) -> None:
    from defectforge.segmentation.config import SegConfig
    from defectforge.trainables.seg import config_from_manifest, run_seg_training

    tracking = tracking_of(args)
    cfg = config_from_manifest(args.data, **given(args, SegConfig))
    summary = run_seg_training(cfg, args.out, resume=args.resume, tracking=tracking)
    print(best_line(args.out, summary["best"]))


def best_line(out, best: dict) -> str:
    return (
        f"best epoch {best['epoch']}: val binary defect IoU "
        f"{best['val_binary_defect_iou']:.4f}, mean defect IoU "
        f"{best['val_mean_defect_iou'] or 0:.4f}; model and plots in {out}"
    )


def _evaluate(args) -> None:
    from defectforge.datasets.build import BuildConfig
    from defectforge.segmentation.inference import evaluate_dataset_split, evaluate_folder

    defaults = {spec.name: spec.default for spec in BuildConfig.options()}
    reading = {**defaults, **_checked_given(args, BuildConfig, MASK_READING)}
    if args.split:
        _refuse_mask_files_beside_split(args)
        result = evaluate_dataset_split(args.model, args.split, reading["binary"])
    else:
        result = evaluate_folder(
            args.model,
            args.images,
            args.masks or args.images,
            reading["binary"],
            reading["mask_threshold"],
            reading["mask_suffix"],
            reading["missing_mask"] == "background",
        )
    if args.json:
        print(json.dumps(result))
        return
    auroc = result["image_auroc"]
    print(
        f"binary defect IoU {result['binary_defect_iou']:.4f}, mean defect IoU "
        f"{result['mean_defect_iou'] or 0:.4f}; images {result['images']}: AUROC "
        f"{'n/a' if auroc is None else f'{auroc:.4f}'}, at threshold "
        f"{result['operating_point']['threshold']} / min area "
        f"{result['operating_point']['min_area']} px: recall {result['recall']:.3f}, "
        f"false-alarm rate {result['false_alarm_rate']:.3f} {result['verdicts']}"
    )


def _refuse_mask_files_beside_split(args) -> None:
    """A split's masks are the dataset's own: options that read mask files would be ignored."""
    from defectforge.core.errors import ConfigError
    from defectforge.datasets.build import BuildConfig

    reading = set(given(args, BuildConfig, only=MASK_READING)) - {"binary"}
    flags = (["--masks"] if args.masks else []) + [
        "--" + name.replace("_", "-") for name in sorted(reading)
    ]
    if flags:
        raise ConfigError(
            f"--split {args.split} with {', '.join(flags)}: a split's masks come from the "
            "dataset, so these would be ignored; leave them out, or evaluate folders with "
            "--images and --masks"
        )


def _calibrate(args) -> None:
    from defectforge.segmentation.calibrate import calibrate_run
    from defectforge.segmentation.decisions import CalibrationTarget

    target = CalibrationTarget(**given(args, CalibrationTarget))
    result = calibrate_run(args.run, target.target_recall, target.target_false_alarm)
    point = result["operating_point"]
    met = "" if result["met"] else " (target not reached: the closest point)"
    defective, images = result["defective_images"], result["images"]
    recall = _rate(result["recall"], defective, "no defective val image")
    false_alarm = _rate(result["false_alarm_rate"], images - defective, "no defect-free val image")
    print(
        f"operating point: defect probability >= {point['threshold']} over at least "
        f"{point['min_area']} px; on {images} val images ({defective} defective) recall "
        f"{recall}, false-alarm rate {false_alarm}{met}; stored in {args.run}"
    )


def _rate(value: float, images: int, without: str) -> str:
    """A rate over ``images`` images, or why there is none (0.000 would read as measured)."""
    return f"{value:.3f}" if images else f"n/a ({without})"


def export_line(meta: dict, out) -> str:
    check = meta["verification"]
    return (
        f"exported {meta['architecture']} to {out}: max |logit difference| vs PyTorch on "
        f"{check['images']} val images "
        + ", ".join(f"{k} {v:.2e}" for k, v in check["max_abs_logit_difference"].items())
    )


def _export(args) -> None:
    from defectforge.segmentation.export import export_trained_run

    print(export_line(export_trained_run(args.run, args.out, args.overwrite), args.out))


def _predict(args) -> None:
    # An export runs with onnxruntime or torch.jit alone: nothing else is imported for it.
    from defectforge.datasets.build import BuildConfig
    from defectforge.segmentation.decisions import OperatingPoint
    from defectforge.segmentation.exported import is_export, predict_folder_exported
    from defectforge.segmentation.predictions import REJECTED_FILE, rejected_files

    options = {
        "threshold": None,
        "min_area": None,
        "heatmaps": args.heatmaps,
        **_checked_given(args, OperatingPoint),
        **_checked_given(args, BuildConfig, READING_OPTIONS),
    }
    model = _model_folder(args.model)
    if is_export(model):
        rows = predict_folder_exported(
            model,
            args.images,
            args.out,
            _export_runtime(args),
            args.overwrite,
            device=args.device or "cpu",
            **options,
        )
    else:
        from defectforge.segmentation.exported import refuse_unreadable_model
        from defectforge.segmentation.inference import predict_folder

        refuse_unreadable_model(model)
        _refuse_export_options(args)

        rows = predict_folder(model, args.images, args.out, args.overwrite, **options)
    flagged = sum(row["verdict"] == "NG" for row in rows)
    skipped = len(rejected_files(args.out))
    listed = f"; {skipped} skipped as bad, listed in {REJECTED_FILE}" if skipped else ""
    print(
        f"{len(rows)} image{'s' * (len(rows) != 1)}: {flagged} NG, {len(rows) - flagged} OK; "
        "masks, overlays and "
        f"predictions.csv in {args.out}{listed}"
    )


def _refuse_export_options(args) -> None:
    """--runtime and --device choose how an export runs; a run folder runs in PyTorch on the CPU,
    so either given with one would be ignored."""
    from defectforge.core.errors import DataError

    given = [
        f"--{name} {value}" for name in ("runtime", "device") if (value := getattr(args, name))
    ]
    if given and given != ["--device cpu"]:
        raise DataError(
            args.model,
            f"{' and '.join(given)} choose how an export runs, and this is a run folder (it "
            "runs in PyTorch on the CPU)",
            f"export it first (`defectforge seg export {args.model} --out EXPORT`) and predict "
            "with --model EXPORT, or leave them out",
        )


def _export_runtime(args) -> str:
    """The runtime of an export: --runtime, or the one whose file --model names (the file named
    is the file that runs), else ONNX."""
    from defectforge.core.errors import ConfigError
    from defectforge.segmentation.exported import RUNTIME_FILES

    named = next((name for name, file in RUNTIME_FILES.items() if args.model.endswith(file)), None)
    if named and args.runtime and args.runtime != named:
        raise ConfigError(
            f"--model {args.model} is the {named} file and --runtime asks for {args.runtime}; "
            "leave out --runtime, or give the export's folder"
        )
    return args.runtime or named or "onnx"


def _model_folder(model: str) -> str:
    """The folder of a model file given for its folder (``model.onnx``, ``model.pt``)."""
    path = Path(model)
    return str(path.parent) if path.is_file() else model


def interrupted_hint(args) -> str:
    if getattr(args, "seg_command", None) == "train":
        return continue_hint(args.out, "checkpoint")
    return "nothing was published under --out; run the command again"

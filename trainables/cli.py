"""The ``defectforge`` command line. Every command that runs Ray work lives behind this entry.

Errors in user input print one line (``defectforge: error: <file>: <problem>; <fix>``) and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from defectforge.datasets.errors import DataError  # noqa: E402

USER_ERRORS = (DataError, ValueError, FileNotFoundError, FileExistsError)
DEFAULT_CLUSTER_STATE = "runs/cluster"


def _ratios(text: str) -> tuple[float, float, float]:
    parts = tuple(float(x) for x in text.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("give three comma-separated ratios, e.g. 0.7,0.15,0.15")
    return parts


def _pair(text: str) -> tuple[float, float]:
    parts = tuple(float(x) for x in text.split(","))
    if len(parts) != 2:
        raise argparse.ArgumentTypeError("give two comma-separated numbers, e.g. 1,99")
    return parts


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_data_commands(commands) -> None:
    data = commands.add_parser("data", help="build and augment Parquet datasets").add_subparsers(
        dest="data_command", required=True
    )
    build = data.add_parser("build", help="raw folder -> Parquet dataset + manifest.json")
    build.add_argument("--source", required=True, choices=["neu-seg", "folder", "steel"])
    build.add_argument("--root", required=True, help="folder holding the raw images and masks")
    build.add_argument("--out", required=True, help="dataset folder to write")
    build.add_argument("--name", help="dataset name (default: neu-seg or the root folder's name)")
    build.add_argument(
        "--classes",
        type=_names,
        help="class names in mask-value order, background first, e.g. background,scratch,dent",
    )
    build.add_argument("--channels", type=int, choices=[1, 3])
    build.add_argument("--binary", action="store_true", help="all defect classes -> 1")
    build.add_argument(
        "--mask-threshold",
        type=int,
        help="masks are 0-255 / soft: pixel >= T is defect (class from folder)",
    )
    build.add_argument("--mask-suffix", default="", help="mask stem suffix, e.g. _mask")
    build.add_argument(
        "--class-from-folder",
        action="store_true",
        help="each image's defect class is its folder's name",
    )
    build.add_argument(
        "--split-ratios",
        type=_ratios,
        default=(0.7, 0.15, 0.15),
        help="train,val,test for folders without split subfolders",
    )
    build.add_argument(
        "--test-fraction",
        type=float,
        default=0.0,
        help="carve this fraction of train into a test split (NEU-Seg ships none)",
    )
    build.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable or inconsistent samples and list them in rejected.csv",
    )
    build.add_argument(
        "--maps",
        type=_names,
        default=("curvature", "range", "texture"),
        help="steel: file stems of the R, G, B maps in each sample folder",
    )
    build.add_argument(
        "--robust",
        action="store_true",
        help="steel captures: drop each pixel's darkest and brightest light (>= 5 lights)",
    )
    build.add_argument(
        "--clip-percentiles",
        type=_pair,
        default=(1.0, 99.0),
        help="steel: 16-bit/float maps are clipped at these percentiles, then scaled to 8 bits",
    )
    build.add_argument("--overwrite", action="store_true")
    simulate = data.add_parser(
        "simulate-steel",
        help="render simulated galvanized steel under K lights (a stand-in, not real data)",
    )
    simulate.add_argument("--n", type=int, default=300, help="sheets to render")
    simulate.add_argument("--out", required=True)
    simulate.add_argument("--lights", type=int, default=6)
    simulate.add_argument("--size", type=int, default=256)
    simulate.add_argument("--max-defects", type=int, default=3, help="per sheet (0..max)")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--overwrite", action="store_true")
    augment = data.add_parser("augment", help="offline k-fold paper augmentation of train")
    augment.add_argument("--data", required=True)
    augment.add_argument("--out", required=True)
    augment.add_argument("--factor", type=int, default=15)
    augment.add_argument("--strength", type=float, default=1.0)
    augment.add_argument("--seed", type=int, default=0)
    augment.add_argument("--overwrite", action="store_true")
    mix = data.add_parser("mix", help="real + labelled synthetic train rows at a synthetic ratio")
    mix.add_argument("--real", required=True, help="real dataset (`data build`)")
    mix.add_argument("--synthetic", required=True, help="labelled synthetic set (`synth label`)")
    mix.add_argument("--ratio", type=float, required=True, help="synthetic / (real + synthetic)")
    mix.add_argument("--out", required=True)
    mix.add_argument("--seed", type=int, default=0, help="which synthetic images are chosen")
    mix.add_argument(
        "--per-class", action="store_true", help="synthetic classes follow the real proportions"
    )
    mix.add_argument(
        "--allow-fewer",
        action="store_true",
        help="too few synthetic images: use them all and record the achieved ratio",
    )
    mix.add_argument(
        "--augment-factor", type=int, default=1, help="then expand train k-fold (paper: 15)"
    )
    mix.add_argument("--augment-strength", type=float, default=1.0)
    mix.add_argument("--overwrite", action="store_true")


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        height, width = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        height = width = 0
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(
            f"give a size as HxW or one side, e.g. 200x200, not {text!r}"
        )
    return height, width


def add_synth_commands(commands) -> None:
    synth = commands.add_parser("synth", help="pseudo-label generated images").add_subparsers(
        dest="synth_command", required=True
    )
    label = synth.add_parser("label", help="label generated images with a trained seg model")
    label.add_argument("--images", required=True, help="`gan generate` output or image folder")
    label.add_argument("--labeler", required=True, help="run folder of `seg train`")
    label.add_argument("--out", required=True)
    label.add_argument(
        "--fill-holes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fill holes inside predicted regions (the paper's correction; default on)",
    )
    label.add_argument("--closing-kernel", type=int, default=0, help="morphological closing (px)")
    label.add_argument("--min-region-area", type=int, default=0, help="drop smaller regions (px)")
    label.add_argument(
        "--min-confidence", type=float, default=0.0, help="drop images labelled less surely"
    )
    label.add_argument("--binary", action="store_true", help="defect vs background masks")
    label.add_argument(
        "--size", type=_size, help="label at HxW (default: the labeller's common train size)"
    )
    label.add_argument("--actors", type=int, default=1, help="labeller copies (one model each)")
    label.add_argument("--batch-size", type=int, default=16)
    label.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    label.add_argument("--overwrite", action="store_true")


def add_seg_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="deeplabv3plus")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--encoder-weights", help="'imagenet' (needs network) or a local file")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=0, help="resize to this (0: native)")
    parser.add_argument(
        "--crop-size",
        type=int,
        default=128,
        help="random training crops at native scale (0: whole images)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--loss", default="ce+dice", help="e.g. ce, dice, focal, ce:0.3+tversky")
    parser.add_argument(
        "--tversky-alpha",
        type=float,
        default=0.5,
        help="weight of false positives; 1-alpha weighs missed defects",
    )
    parser.add_argument("--aug-strength", type=float, default=0.5)
    parser.add_argument("--binary", action="store_true", help="train defect vs background")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps-per-epoch", type=int, default=0, help="smoke runs")
    parser.add_argument("--synthetic", default="", help="labelled synthetic set to mix in")
    parser.add_argument("--synthetic-ratio", type=float, default=0.0)
    parser.add_argument("--mix-seed", type=int, default=0)
    parser.add_argument("--mix-per-class", action="store_true")


def seg_options(args: argparse.Namespace) -> dict:
    return {
        "arch": args.arch,
        "encoder": args.encoder,
        "encoder_weights": args.encoder_weights,
        "epochs": args.epochs,
        "image_size": args.image_size,
        "crop_size": args.crop_size,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "loss": args.loss,
        "tversky_alpha": args.tversky_alpha,
        "aug_strength": args.aug_strength,
        "binary": args.binary,
        "workers": args.workers,
        "use_gpu": args.use_gpu,
        "seed": args.seed,
        "max_steps_per_epoch": args.max_steps_per_epoch,
        "synthetic": str(Path(args.synthetic).resolve()) if args.synthetic else "",
        "synthetic_ratio": args.synthetic_ratio,
        "mix_seed": args.mix_seed,
        "mix_per_class": args.mix_per_class,
    }


def add_seg_commands(commands) -> None:
    seg = commands.add_parser("seg", help="train and evaluate segmentation models").add_subparsers(
        dest="seg_command", required=True
    )
    train = seg.add_parser("train", help="train on a Parquet dataset with Ray Train")
    train.add_argument("--data", required=True)
    train.add_argument("--out", required=True, help="run folder")
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --out, e.g. to more --epochs"
    )
    add_seg_train_options(train)
    evaluate = seg.add_parser("eval", help="evaluate a trained model on a folder of images")
    evaluate.add_argument("--model", required=True, help="run folder of `seg train`")
    evaluate.add_argument("--images", required=True)
    evaluate.add_argument("--masks", required=True)
    evaluate.add_argument("--binary", action="store_true", help="score defect vs background only")
    evaluate.add_argument("--mask-threshold", type=int, help="for 0-255 / soft masks")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    predict = commands.add_parser("predict", help="mask and overlay PNGs for a folder of images")
    predict.add_argument(
        "--model", required=True, help="a run folder (seg train) or an export (study export)"
    )
    predict.add_argument("--images", required=True)
    predict.add_argument("--out", required=True)
    predict.add_argument(
        "--runtime",
        choices=["onnx", "torchscript"],
        default="onnx",
        help="for an export: which of its two files runs",
    )


def add_gan_commands(commands) -> None:
    gan = commands.add_parser("gan", help="StyleGAN2 + DiffAugment: train, generate, metrics")
    sub = gan.add_subparsers(dest="gan_command", required=True)
    train = sub.add_parser("train", help="train on a Parquet dataset with Ray Train")
    train.add_argument("--data", required=True)
    train.add_argument("--out", required=True, help="run folder")
    train.add_argument("--profile", default="cpu-small", choices=["cpu-small", "gpu"])
    train.add_argument("--resolution", type=int)
    train.add_argument("--kimg", type=float, required=True, help="thousands of real images shown")
    train.add_argument("--workers", type=int)
    train.add_argument("--use-gpu", action="store_true")
    train.add_argument("--batch-size", type=int, help="per worker")
    train.add_argument("--diffaug", help="e.g. color,translation,cutout ('' for none)")
    train.add_argument("--diffaug-strength", type=float)
    train.add_argument("--r1-gamma", type=float, help="default: 0.0002 * resolution^2 / batch")
    train.add_argument("--pl-weight", type=float, help="path-length regularisation (0: off)")
    train.add_argument("--snapshot-kimg", type=float)
    train.add_argument("--conditional", action="store_true", help="condition on defect class")
    train.add_argument("--class", dest="defect_class", help="train on one defect class only")
    train.add_argument("--seed", type=int)
    train.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        help="bf16: mixed precision, ~1.4x on GPUs and CPUs with native bf16 (profile gpu's default)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest snapshot up to --kimg",
    )
    generate = sub.add_parser("generate", help="images by seed -> PNGs + Parquet rows")
    generate.add_argument("--model", required=True, help="run folder of `gan train`")
    generate.add_argument("--out", required=True)
    generate.add_argument("--n", type=int, default=100)
    generate.add_argument("--seeds", help="comma-separated seeds or a range a-b (overrides --n)")
    generate.add_argument("--truncation", type=float, default=1.0)
    generate.add_argument("--class", dest="class_name", help="class of a conditional generator")
    generate.add_argument("--overwrite", action="store_true")
    metrics = sub.add_parser("metrics", help="sliced Wasserstein distance to real images")
    metrics.add_argument("--model", required=True)
    metrics.add_argument("--data", help="dataset to compare with (default: the training data)")
    metrics.add_argument("--n", type=int, default=0, help="images per set (default: config's)")
    metrics.add_argument("--inception", help="local torchvision inception_v3 weights: adds FID/KID")
    metrics.add_argument(
        "--class",
        dest="class_name",
        help="score one class (default: all, a conditional G's in turn)",
    )


def parse_seeds(text: str | None, count: int) -> list[int]:
    if not text:
        return list(range(count))
    if "-" in text and "," not in text:
        first, last = (int(x) for x in text.split("-"))
        return list(range(first, last + 1))
    return [int(x) for x in text.split(",")]


def run_gan(args) -> None:
    from defectforge.trainables import gan

    if args.gan_command == "train":
        options = {
            "resolution": args.resolution,
            "kimg": args.kimg,
            "workers": args.workers,
            "use_gpu": args.use_gpu or None,
            "batch_size": args.batch_size,
            "diffaug": args.diffaug,
            "diffaug_strength": args.diffaug_strength,
            "r1_gamma": args.r1_gamma,
            "pl_weight": args.pl_weight,
            "snapshot_kimg": args.snapshot_kimg,
            "conditional": args.conditional or None,
            "defect_class": args.defect_class,
            "seed": args.seed,
            "precision": args.precision,
        }
        cfg = gan.gan_config_from_manifest(args.data, args.profile, **options)
        summary = gan.run_gan_training(cfg, args.out, resume=args.resume)
        final, best = summary["final"], summary["best"]
        print(
            f"kimg {final['kimg']:.2f}: SWD {final.get('swd', float('nan')):.1f}; published the "
            f"lowest-SWD snapshot (kimg {best['kimg']:.2f}, SWD {best['swd']:.1f}) with metrics "
            f"and sample grids in {args.out}"
        )
    elif args.gan_command == "generate":
        seeds = parse_seeds(args.seeds, args.n)
        gan.write_generated(
            args.model, args.out, seeds, args.truncation, args.class_name, args.overwrite
        )
        print(f"wrote {len(seeds)} images (PNG + Parquet) to {args.out}")
    else:
        result = gan.generator_metrics(
            args.model, args.data, args.n, args.inception, args.class_name
        )
        print(json.dumps(result))


def run_synth(args) -> None:
    from defectforge.segmentation.pseudo_label import LabelConfig
    from defectforge.trainables.synth import label_synthetic

    height, width = args.size or (0, 0)
    cfg = LabelConfig(
        images=str(Path(args.images).resolve()),
        labeler=str(Path(args.labeler).resolve()),
        fill_holes=args.fill_holes,
        closing_kernel=args.closing_kernel,
        min_region_area=args.min_region_area,
        min_confidence=args.min_confidence,
        binary=args.binary,
        height=height,
        width=width,
        actors=args.actors,
        batch_size=args.batch_size,
        use_gpu=args.use_gpu,
    )
    result = label_synthetic(cfg, args.out, args.overwrite)
    labelling = result["manifest"]["labelling"]
    print(
        f"kept {labelling['kept']} of {labelling['images']} images (dropped: "
        f"{labelling['dropped'] or 'none'}); labels, report and plots in {args.out}"
    )
    for variant, summary in (result["quality"] or {}).items():
        print(
            f"labeller on real val, {variant}: binary defect IoU "
            f"{summary['binary_defect_iou']:.4f}, mean defect IoU {summary['mean_defect_iou']:.4f}"
        )


def add_quickstart(commands) -> None:
    quick = commands.add_parser(
        "quickstart",
        help="build, train and evaluate on the bundled NEU-Seg sample (or --data) on a local Ray",
    )
    quick.add_argument(
        "--data",
        help="NEU-Seg root (default: the bundled sample); with --source steel, steel rig output "
        "(default: a simulated set rendered on the spot)",
    )
    quick.add_argument("--source", choices=("neu-seg", "steel"), default="neu-seg")
    quick.add_argument("--out", default="runs/quickstart")
    quick.add_argument("--epochs", type=int, default=None)


def add_study_commands(commands) -> None:
    study = commands.add_parser(
        "study", help="Ray Tune + Optuna studies: run, resume, report, export"
    ).add_subparsers(dest="study_command", required=True)
    run = study.add_parser("run", help="search, held-out final step, report")
    run.add_argument("spec", help="study spec YAML (see studies/specs/)")
    run.add_argument("--name", help="study folder name under storage_path (default: spec name)")
    run.add_argument("--address", help="Ray address: auto or ray://HOST:10001 (default: local)")
    resume = study.add_parser("resume", help="continue a study whose driver stopped")
    resume.add_argument("dir", help="the study folder (storage_path/name)")
    resume.add_argument("--address")
    report = study.add_parser("report", help="redraw report.md and its plots")
    report.add_argument("dir")
    export = study.add_parser("export", help="best model -> TorchScript + ONNX + model.json")
    export.add_argument("dir")
    export.add_argument("--out", required=True, help="export folder to write")
    export.add_argument("--overwrite", action="store_true")


def add_cluster_commands(commands) -> None:
    cluster = commands.add_parser(
        "cluster", help="a multi-node Ray cluster on this machine (development, tests)"
    ).add_subparsers(dest="cluster_command", required=True)
    up = cluster.add_parser("up", help="start a head and N worker nodes, token auth on")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--cpus-per-worker", type=int, default=1)
    up.add_argument("--head-cpus", type=int, default=1)
    up.add_argument("--object-store-mib", type=int, default=512)
    up.add_argument("--dashboard-port", type=int, default=8265)
    up.add_argument(
        "--hide-from-last-worker",
        default="",
        metavar="FOLDER",
        help="Linux, root: the last worker sees FOLDER empty, like a node without a shared mount",
    )
    for name, text in (
        ("down", "stop the nodes `cluster up` started (recorded pids only)"),
        ("status", "the recorded nodes and whether they run"),
    ):
        cluster.add_parser(name, help=text)
    for sub in cluster.choices.values():
        sub.add_argument("--state", default=DEFAULT_CLUSTER_STATE, help="cluster state folder")


def add_job_commands(commands) -> None:
    submit = commands.add_parser("submit", help="submit a study to a Ray cluster as a Ray Job")
    submit.add_argument("spec", help="study spec YAML")
    submit.add_argument("--address", required=True, help="dashboard URL, http://HOST:8265")
    submit.add_argument("--name", help="study folder name (default: spec name)")
    submit.add_argument("--wheel", help="a prebuilt defectforge wheel (default: build one)")
    submit.add_argument(
        "--no-pip", action="store_true", help="the cluster's image has the dependencies"
    )
    submit.add_argument("--wait", action="store_true", help="return when the job ends")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs")
    jobs = commands.add_parser("jobs", help="list, inspect and stop Ray Jobs").add_subparsers(
        dest="jobs_command", required=True
    )
    jobs.add_parser("list", help="jobs on the cluster, newest first")
    for name, text in (
        ("status", "one job's status"),
        ("logs", "one job's logs"),
        ("stop", "stop a running job"),
    ):
        jobs.add_parser(name, help=text).add_argument("job_id")
    jobs.choices["logs"].add_argument("--follow", action="store_true")
    for sub in (submit, *jobs.choices.values()):
        sub.add_argument("--token-file", help="Ray auth token file (default: Ray's own lookup)")
    for sub in jobs.choices.values():
        sub.add_argument("--address", required=True, help="dashboard URL, http://HOST:8265")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="defectforge", description=__doc__.splitlines()[0])
    commands = root.add_subparsers(dest="command", required=True)
    add_data_commands(commands)
    add_seg_commands(commands)
    add_gan_commands(commands)
    add_synth_commands(commands)
    add_study_commands(commands)
    add_quickstart(commands)
    add_cluster_commands(commands)
    add_job_commands(commands)
    return root


def run_mix(args) -> dict:
    from defectforge.datasets.mix import MixConfig
    from defectforge.trainables.mix import mix_datasets

    cfg = MixConfig(args.ratio, args.seed, args.per_class, args.allow_fewer)
    manifest = mix_datasets(
        args.real,
        args.synthetic,
        cfg,
        args.out,
        args.augment_factor,
        args.augment_strength,
        args.overwrite,
    )
    mix = manifest["mix"]
    print(
        f"train: {mix['real_images']} real + {mix['synthetic_images']} synthetic, ratio "
        f"{mix['achieved_ratio']:.4f} (requested {mix['requested_ratio']})"
    )
    return manifest


def run_simulate_steel(args) -> None:
    from defectforge.datasets.steel import write_preview, write_simulation
    from defectforge.datasets.steel_sim import SimulationConfig

    cfg = SimulationConfig(
        n=args.n, size=args.size, lights=args.lights, max_defects=args.max_defects, seed=args.seed
    )
    summary = write_simulation(cfg, args.out, args.overwrite)
    preview = write_preview(args.out, Path(args.out) / "preview.png")
    print(
        f"wrote {cfg.n} simulated sheets ({cfg.lights} lights, {cfg.size} px) to {args.out}: "
        f"defects drawn {summary['defects_drawn']}, {summary['defect_free_sheets']} defect-free; "
        f"preview {preview}"
    )


def run_data(args) -> None:
    from defectforge.datasets.build import BuildConfig
    from defectforge.datasets.steel import SteelOptions
    from defectforge.trainables.data_jobs import augment_parquet, build_parquet

    if args.data_command == "simulate-steel":
        run_simulate_steel(args)
        return
    if args.data_command == "mix":
        manifest = run_mix(args)
    elif args.data_command == "build":
        manifest = build_parquet(
            BuildConfig(
                source=args.source,
                root=args.root,
                out=args.out,
                name=args.name,
                classes=args.classes,
                channels=args.channels,
                binary=args.binary,
                mask_threshold=args.mask_threshold,
                mask_suffix=args.mask_suffix,
                class_from_folder=args.class_from_folder,
                split_ratios=args.split_ratios,
                test_fraction=args.test_fraction,
                skip_bad=args.skip_bad,
                overwrite=args.overwrite,
                steel=SteelOptions(args.maps, args.robust, args.clip_percentiles),
            )
        )
    else:
        manifest = augment_parquet(
            args.data, args.out, args.factor, args.strength, args.seed, args.overwrite
        )
    counts = {split: c["total"] for split, c in manifest["counts"].items()}
    print(
        f"wrote {args.out}: {counts} rows, classes {manifest['classes']}, "
        f"{manifest['rejected'] if 'rejected' in manifest else 0} rejected"
    )


def run_seg(args) -> None:
    from defectforge.segmentation.inference import evaluate_folder

    if args.seg_command == "train":
        from defectforge.segmentation.report import write_run_plots
        from defectforge.trainables.seg import config_from_manifest, run_seg_training

        cfg = config_from_manifest(args.data, **seg_options(args))
        summary = run_seg_training(cfg, args.out, resume=args.resume)
        write_run_plots(args.out)
        print(_best_line(args.out, summary["best"]))
        return
    result = evaluate_folder(args.model, args.images, args.masks, args.binary, args.mask_threshold)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"binary defect IoU {result['binary_defect_iou']:.4f}, mean defect IoU "
            f"{result['mean_defect_iou']:.4f}, per class {result['per_class_iou']}"
        )


def _best_line(out, best: dict) -> str:
    return (
        f"best epoch {best['epoch']}: val binary defect IoU "
        f"{best['val_binary_defect_iou']:.4f}, mean defect IoU "
        f"{best['val_mean_defect_iou']:.4f}; model and plots in {out}"
    )


def run_predict(args) -> None:
    from defectforge.segmentation.exported import is_export, predict_folder_exported

    if is_export(args.model):
        written = predict_folder_exported(args.model, args.images, args.out, args.runtime)
    else:
        from defectforge.segmentation.inference import predict_folder

        written = predict_folder(args.model, args.images, args.out)
    print(f"wrote {written} mask and overlay PNGs to {args.out}")


def _study_line(summary: dict) -> str:
    best, final = summary["best"], summary["final"]
    line = f"best trial {best['trial']}: val binary defect IoU {best['val_binary_defect_iou']:.4f}"
    if final:
        test = final["test_binary_defect_iou"]
        line += (
            f"; held-out test {test['mean']:.4f} ± {test['half_width']:.4f} "
            f"(95% CI, {test['n']} seeds)"
        )
    return line


def run_study_command(args) -> None:
    from defectforge.trainables import study

    if args.study_command == "export":
        meta = study.export_study(args.dir, args.out, args.overwrite)
        check = meta["verification"]
        print(
            f"exported {meta['architecture']} ({meta['metrics']['chosen']}) to {args.out}: "
            f"max |logit difference| vs PyTorch on {check['images']} val images "
            + ", ".join(f"{k} {v:.2e}" for k, v in check["max_abs_logit_difference"].items())
        )
        return
    if args.study_command == "run":
        summary = study.run_study(args.spec, args.name, args.address)
    elif args.study_command == "resume":
        summary = study.resume_study(args.dir, args.address)
    else:
        summary = study.report_only(args.dir)
    print(_study_line(summary))
    print(f"report: {summary['location']}")


def run_quickstart(args) -> None:
    from defectforge.trainables.quickstart import quickstart

    quickstart(args.data, Path(args.out), args.epochs, args.source)


def run_cluster(args) -> None:
    from defectforge.cluster.local import LocalCluster, LocalClusterConfig

    cluster = LocalCluster(args.state)
    if args.cluster_command == "up":
        state = cluster.up(
            LocalClusterConfig(
                workers=args.workers,
                cpus_per_worker=args.cpus_per_worker,
                head_cpus=args.head_cpus,
                object_store_mib=args.object_store_mib,
                dashboard_port=args.dashboard_port,
                hide_from_last_worker=args.hide_from_last_worker,
            )
        )
        print(
            f"cluster up: head + {args.workers} workers at {state['address']}; dashboard and "
            f"Jobs API {state['dashboard_url']} (token auth); "
            f"`defectforge cluster down --state {args.state}` stops it"
        )
    elif args.cluster_command == "down":
        stopped = cluster.down()
        print(f"stopped {', '.join(stopped)}" if stopped else "no cluster recorded here")
    else:
        state = cluster.state()
        if state is None:
            print(f"no cluster recorded in {args.state}")
            return
        running = {node.role for node in cluster.running()}
        print(f"{state['address']}  dashboard {state['dashboard_url']}")
        for node in state["nodes"]:
            alive = "running" if node["role"] in running else "stopped"
            print(f"  {node['role']:<10} pid {node['pid']:<8} {alive}  log {node['log']}")


@contextlib.contextmanager
def _jobs_api_errors(address: str):
    """The Jobs SDK raises RuntimeError for HTTP failures (refused token, unknown job): shown as
    one line naming the cluster."""
    from ray.exceptions import RayError

    try:
        yield
    except (RuntimeError, RayError, ConnectionError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), repr(err))
        raise ValueError(f"{address}: {first}") from None


def run_submit(args) -> int:
    from defectforge.cluster import jobs

    text = jobs.shipped_spec(args.spec)  # a bad spec is refused before anything connects
    with _jobs_api_errors(args.address):
        client = jobs.jobs_client(args.address, args.token_file)
        job_id = jobs.submit_study(client, text, args.name, args.wheel, not args.no_pip)
    print(f"submitted {job_id}; watch it at {jobs.job_url(args.address, job_id)}", flush=True)
    if not (args.wait or args.follow):
        return 0
    status = jobs.follow(client, job_id) if args.follow else jobs.wait_for(client, job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def run_jobs(args) -> int:
    from defectforge.cluster import jobs

    with _jobs_api_errors(args.address):
        return _jobs_command(jobs, jobs.jobs_client(args.address, args.token_file), args)


def _jobs_command(jobs, client, args) -> int:
    if args.jobs_command == "list":
        for row in jobs.job_rows(client):
            print(f"{row['id']:<44} {row['status']:<10} {row['started']:<26} {row['study']}")
    elif args.jobs_command == "status":
        print(client.get_job_status(args.job_id).value)
    elif args.jobs_command == "logs":
        if args.follow:
            jobs.follow(client, args.job_id)
        else:
            print(client.get_job_logs(args.job_id), end="")
    else:
        stopped = client.stop_job(args.job_id)
        print(f"stop requested for {args.job_id}" if stopped else f"{args.job_id} is not running")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handlers = {
        "data": run_data,
        "seg": run_seg,
        "gan": run_gan,
        "synth": run_synth,
        "predict": run_predict,
        "study": run_study_command,
        "quickstart": run_quickstart,
        "cluster": run_cluster,
        "submit": run_submit,
        "jobs": run_jobs,
    }
    try:
        code = handlers[args.command](args)
    except USER_ERRORS as err:
        print(f"defectforge: error: {err}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())

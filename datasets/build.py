"""What a Parquet build does, without Ray: typed config, per-batch row loading, the manifest.

``defectforge.trainables.data_jobs`` runs these pieces over Ray Data.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import MISSING, asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from defectforge.core.config import TypedConfig, option
from defectforge.core.errors import ConfigError, DataError
from defectforge.core.outputs import NAME_RULE, name_problem
from defectforge.datasets.contract import SCHEMA, combined_digest
from defectforge.datasets.discover import (
    NEU_SEG_CLASSES,
    discover_folder,
    discover_neu_seg,
    read_class_file,
)
from defectforge.datasets.images import DEFAULT_MAX_PIXELS, INPUT_BITS, SKIP_BAD_HINT
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.readers import guess_channels, load_sample
from defectforge.datasets.samples import SampleRef, SampleSpec
from defectforge.datasets.steel import SIMULATION_FILE, SteelOptions, discover_steel
from defectforge.datasets.twins import Twins

SOURCES = ("neu-seg", "folder", "steel")
# Raised when a build of the same files with the same settings makes other data, so that a
# pipeline builds its data stage again (2: pixel-identical images kept in one split; 3: mask
# trees, split and class folders as users name them, hidden files left out, EXIF orientation).
BUILD_RULES = 3
# A load's rows: the contract's columns and what the manifest and --skip-bad need.
LOAD_SCHEMA = (
    SCHEMA.append(pa.field("rejected", pa.string()))
    .append(pa.field("input_digest", pa.string()))
    .append(pa.field("pixel_digest", pa.string()))
    .append(pa.field("split_group", pa.string()))
    .append(pa.field("mask_digest", pa.string()))
    .append(pa.field("mask_missing", pa.bool_()))
    .append(pa.field("pixel_sum", pa.list_(pa.float64())))
    .append(pa.field("pixel_sumsq", pa.list_(pa.float64())))
)


def _group_rule_ok(rule: str) -> bool:
    try:
        re.compile(rule)
    except re.error:
        return False
    return True


def _ratios_ok(ratios: tuple[float, ...]) -> bool:
    return len(ratios) == 3 and abs(sum(ratios) - 1) <= 1e-6 and min(ratios) >= 0


# Options a source's layout never reads: one set there would be silently ignored, so it is refused.
UNUSED_BY_SOURCE = {
    "neu-seg": (
        "split_ratios",
        "mask_suffix",
        "class_from_folder",
        "group_by",
        "steel",
        "input_bits",
    ),
    "steel": (
        "test_fraction",
        "mask_suffix",
        "class_from_folder",
        "group_by",
        "channels",
        "missing_mask",
        "input_bits",
    ),
    "folder": ("test_fraction", "steel"),
}
# ...unless set to what the source does anyway.
AGREES_WITH_SOURCE = {("steel", "channels"): 3}
UNUSED_HINT = {
    "test_fraction": "its split_ratios' third number is the test share",
    "split_ratios": "NEU-Seg has its own train/test folders; test_fraction carves a test split",
    "channels": "steel images are always its three maps",
    "missing_mask": "every steel sample folder holds its mask.png",
    "steel": "--maps, --robust and --clip-percentiles are for source steel",
    ("neu-seg", "input_bits"): "NEU-Seg's images are 8-bit",
    ("steel", "input_bits"): "steel's --clip-percentiles scale 16-bit maps to 8 bits",
}


@dataclass(frozen=True)
class BuildConfig(TypedConfig):
    """Everything that decides a dataset's content; saved in its manifest."""

    kind = "build config"

    source: str = option(
        help="layout of the raw folder: neu-seg (NEU-Seg's images/ and masks/), folder (your "
        "images with masks beside them), steel (photometric-stereo rig output or a simulation)",
        choices=SOURCES,
    )
    root: str = option(help="folder holding the raw images and masks", path="local")
    name: str | None = option(
        None,
        "dataset name, the prefix of its sample ids, which the hash split reads: set it to keep "
        "the splits when the root folder is renamed; none: neu-seg or the root folder's name",
        lambda name: not name_problem(name),
        NAME_RULE,
    )
    classes: tuple[str, ...] | None = option(
        None,
        "class names in mask-value order, background first, e.g. background,scratch,dent",
        lambda c: len(c) >= 2,
        "background plus at least one defect class",
    )
    channels: int | None = option(
        None,
        "1 (grey) or 3 (RGB; grey images are read as 3 equal channels); none: from the first "
        "image that can be read",
        choices=(1, 3),
    )
    binary: bool = option(False, "all defect classes -> 1")
    mask_threshold: int | None = option(
        None,
        "masks are 0-255 / soft: a pixel >= T is defect (its class: the image's folder with "
        "--class-from-folder in data build, else the one defect class)",
        lambda t: 1 <= t <= 255,
        "in 1..255",
    )
    mask_suffix: str = option(
        "", "masks are the files named <stem><suffix> beside their images, e.g. _mask"
    )
    class_from_folder: bool = option(False, "each image's defect class is its folder's name")
    split_ratios: tuple[float, ...] = option(
        (0.7, 0.15, 0.15),
        "train,val,test for folders without split subfolders",
        _ratios_ok,
        "three non-negative numbers summing to 1",
    )
    test_fraction: float = option(
        0.0,
        "carve this fraction of train into a test split (NEU-Seg ships none)",
        lambda f: 0 <= f < 1,
        "in [0, 1)",
    )
    missing_mask: str = option(
        "error",
        "an image without a mask: error, or background (defect-free, as in good/ folders)",
        choices=("error", "background"),
    )
    group_by: str = option(
        "",
        "keep groups in one split: parent (the image's folder), or a regex on the path under "
        "--root whose first group names the group, e.g. 'Part(\\d+)'; none: each image alone",
        _group_rule_ok,
        "parent or a valid regular expression",
    )
    skip_bad: bool = option(
        False, "skip unreadable or inconsistent samples and list them in rejected.csv"
    )
    max_pixels: int = option(
        DEFAULT_MAX_PIXELS,
        "refuse images with more pixels than this, read from the file header before decoding",
        lambda n: n >= 1,
        ">= 1",
    )
    input_bits: int = option(
        8,
        "bits per value the camera stores: 10, 12, 14 or 16 for images in 16-bit files, "
        "shifted to 8 bits by one scale for the whole set (models of the dataset read them so)",
        choices=INPUT_BITS,
    )
    steel: SteelOptions = option(SteelOptions(), cli=False)

    def check(self) -> None:
        for spec in self.options():
            value = getattr(self, spec.name)
            if spec.name not in UNUSED_BY_SOURCE[self.source] or value in (
                _default_of(spec),
                AGREES_WITH_SOURCE.get((self.source, spec.name), _default_of(spec)),
            ):
                continue
            hint = UNUSED_HINT.get(
                (self.source, spec.name),
                UNUSED_HINT.get(spec.name, f"source {self.source} does not read it"),
            )
            raise ConfigError(
                f"{spec.name} = {_shown(value)} is not used with source {self.source} "
                f"({hint}); remove it"
            )

    @property
    def dataset_name(self) -> str:
        return self.name or ("neu-seg" if self.source == "neu-seg" else Path(self.root).name)


def _shown(value: object) -> str:
    """A value as the user set it: of nested options, only those changed from their default."""
    if not isinstance(value, TypedConfig):
        return repr(value)
    changed = {
        spec.name: getattr(value, spec.name)
        for spec in value.options()
        if getattr(value, spec.name) != _default_of(spec)
    }
    return repr(changed)


def _default_of(spec) -> object:
    return spec.default_factory() if spec.default is MISSING else spec.default


def discover(cfg: BuildConfig) -> tuple[list[SampleRef], SampleSpec]:
    """List the samples and settle the classes and channel count every sample must match."""
    if cfg.source == "neu-seg":
        refs = discover_neu_seg(cfg.root, cfg.test_fraction)
        classes, folder_classes = cfg.classes or NEU_SEG_CLASSES, {}
        channels = cfg.channels or 1
    elif cfg.source == "steel":
        refs = discover_steel(cfg.root, cfg.dataset_name, cfg.split_ratios)
        classes, folder_classes = (
            cfg.classes or read_class_file(cfg.root)[0] or ("background", "defect"),
            {},
        )
        channels = 3
    else:
        file_classes, folder_classes = read_class_file(cfg.root)
        refs = discover_folder(
            cfg.root,
            cfg.dataset_name,
            cfg.split_ratios,
            cfg.mask_suffix,
            cfg.class_from_folder,
            cfg.group_by,
            frozenset([*(cfg.classes or file_classes or ()), *folder_classes]),
        )
        classes = cfg.classes or file_classes or _default_folder_classes(cfg, refs, folder_classes)
        channels = cfg.channels or guess_channels([ref.image_path for ref in refs], cfg.input_bits)
    spec = SampleSpec(
        cfg.dataset_name,
        tuple(classes),
        channels,
        cfg.binary,
        cfg.mask_threshold,
        folder_classes,
        # Only steel needs the root (lights files above a sample); other ids stay location-free.
        steel=cfg.steel if cfg.source == "steel" else None,
        root=os.path.abspath(cfg.root) if cfg.source == "steel" else "",
        max_pixels=cfg.max_pixels,
        input_bits=cfg.input_bits,
        missing_mask_is_background=cfg.missing_mask == "background",
    )
    return refs, spec


def _default_folder_classes(
    cfg: BuildConfig, refs: list[SampleRef], folder_classes: dict[str, str]
) -> tuple[str, ...]:
    if not cfg.class_from_folder:
        return ("background", "defect")
    # A folder none of whose images has a mask (MVTec AD's good/) names no defect class.
    named = sorted(
        {folder_classes.get(r.folder_class, r.folder_class) for r in refs if r.mask_path}
        - {"background", None}
    )
    return ("background", *named)


class RowLoader:
    """Turns a batch of sample refs into contract rows; a bad sample becomes a rejected row."""

    def __init__(self, spec: SampleSpec):
        self.spec = spec

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = []
        for index in range(len(batch["id"])):
            ref = SampleRef(**{key: _plain(batch[key][index]) for key in batch})
            try:
                row = load_sample(ref, self.spec)
                row["rejected"] = ""
            except DataError as err:
                row = _rejected_row(ref, str(err))
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=LOAD_SCHEMA)


def _plain(value):
    # Ray Data hands a column of missing strings over as NaNs (float32), a mixed one as Nones.
    missing = value is None or (isinstance(value, float | np.floating) and np.isnan(value))
    return None if missing else str(value)


def _rejected_row(ref: SampleRef, reason: str) -> dict:
    return {
        "id": ref.id,
        "image": b"",
        "mask": b"",
        "height": 0,
        "width": 0,
        "channels": 0,
        "dataset": "",
        "source": "real",
        "split": ref.split,
        "origin": ref.image_path,
        "rejected": reason,
        "input_digest": "",
        "pixel_digest": "",
        "split_group": None,
        "mask_digest": "",
        "mask_missing": False,
        "pixel_sum": [],
        "pixel_sumsq": [],
    }


def check_rejections(summary_rows: list[dict], cfg: BuildConfig, rejected_csv: Path) -> list[dict]:
    """Raise on the first bad file unless --skip-bad; with it, write rejected.csv. Return good rows."""
    rejected = [r for r in summary_rows if r["rejected"]]
    if rejected and not cfg.skip_bad:
        first = rejected[0]["rejected"]
        more = (
            f" ({len(rejected)} bad files in all; --skip-bad skips them and lists them in "
            "rejected.csv)"
            if len(rejected) > 1
            else SKIP_BAD_HINT
        )
        raise DataError(*_split_message(first, more))
    if rejected:
        with open(rejected_csv, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "file", "reason"])
            for row in rejected:
                writer.writerow([row["id"], row["origin"], row["rejected"]])
    good = [r for r in summary_rows if not r["rejected"]]
    if not good:
        path, problem, fix = _split_message(rejected[0]["rejected"], "")
        raise DataError(
            cfg.root,
            f"every sample was rejected, so nothing was written; the first: {path}: {problem}",
            fix,
        )
    return good


def check_defects(good: list[dict], cfg: BuildConfig) -> None:
    """Refuse a build whose masks mark no defect pixel at all: a threshold above the masks'
    values, or masks that are not masks, would otherwise give a dataset nothing can learn from."""
    read = [r for r in good if not r["mask_missing"]]
    if not read or any(r["defect_class"] is not None for r in good):
        return
    cause = (
        f"--mask-threshold {cfg.mask_threshold} is above every defect pixel's value (masks of "
        "class ids 0, 1, ... need no threshold)"
        if cfg.mask_threshold is not None
        else "check that the masks mark defects with values above 0"
    )
    raise DataError(
        cfg.root,
        f"none of the {len(read)} masks read marks a defect pixel",
        f"{cause}; if these images are defect-free, remove their masks and pass "
        "--missing-mask background",
    )


def _split_message(message: str, more: str) -> tuple[str, str, str]:
    path, _, rest = message.partition(": ")
    problem, _, fix = rest.partition("; ")
    return path, problem, fix + more


def missing_splits(manifest: Manifest, cfg: BuildConfig) -> str:
    """What to tell a user whose build gave no train or no val split ("" when both have
    images): `seg train` and studies need both and would refuse the dataset only then."""
    totals = {split: manifest.split_total(split) for split in ("train", "val", "test")}
    missing = [split for split in ("train", "val") if not totals[split]]
    if not missing:
        return ""
    shown = ", ".join(f"{count} {split}" for split, count in totals.items())
    fix = (
        "add " + " and ".join(f"images/{split} with masks/{split}" for split in missing)
        if cfg.source == "neu-seg"
        else "move some images into a folder of the split's name beside the others (images "
        "in split folders keep their split), or, for images outside split folders, give the "
        "missing split a larger share with --split-ratios (train,val,test, e.g. 0.6,0.2,0.2)"
    )
    return (
        f"the build of {cfg.root} gave no {' and no '.join(missing)} split ({shown} images), so "
        f"`seg train` and studies will refuse this dataset; {fix}"
    )


def empty_folder_classes(manifest: Manifest, cfg: BuildConfig) -> str:
    """What to tell a user whose classes from folder names include one that no mask marks: a
    folder of defect-free images (magnetic-tile's MT_Free) read as a defect class ("" when
    none)."""
    if not cfg.class_from_folder or cfg.binary:
        return ""
    seen = {name for counts in manifest.counts.values() for name in counts.by_class}
    empty = [name for name in manifest.classes[1:] if name not in seen]
    if not empty:
        return ""
    return (
        f"classes {empty} (from folder names) mark no pixel in any mask; if such a folder holds "
        f"defect-free images, map it to background in a classes.yaml beside the images "
        f"(`folders: {{{empty[0]}: background}}`) and build again"
    )


def build_manifest(
    cfg: BuildConfig, spec: SampleSpec, good: list[dict], n_rejected: int, twins: Twins
) -> Manifest:
    """The built dataset's manifest: train pixel statistics, input and content identities;
    ``good`` holds each row's final split (after ``settle_twins``)."""
    mean, std = pixel_statistics([r for r in good if r["split"] == "train"] or good, spec.channels)
    config = asdict(cfg)
    config["root"] = os.path.abspath(cfg.root)
    return Manifest.built(
        config,
        dataset=spec.dataset,
        source=cfg.source,
        spec_identity=spec.identity(),
        inputs_digest=combined_digest({r["id"]: r["input_digest"] for r in good}),
        splits_digest=combined_digest({r["id"]: r["split"] for r in good}),
        classes=spec.output_classes,
        channels=spec.channels,
        binary=spec.binary,
        pixel_mean=tuple(mean),
        pixel_std=tuple(std),
        rejected=n_rejected,
        missing_masks=sum(bool(r["mask_missing"]) for r in good),
        twins=twins.counts(),
        input_bits=spec.input_bits,
        # `data simulate-steel` output must never pass for real data downstream.
        simulated=(Path(cfg.root) / SIMULATION_FILE).is_file(),
    )


def pixel_statistics(rows: list[dict], channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] from per-row sums (stats-then-reduce)."""
    n = sum(r["height"] * r["width"] for r in rows)
    total = np.sum([r["pixel_sum"] for r in rows], axis=0)
    total_sq = np.sum([r["pixel_sumsq"] for r in rows], axis=0)
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 1e-12))
    return [round(float(v) / 255, 6) for v in mean[:channels]], [
        round(float(v) / 255, 6) for v in std[:channels]
    ]

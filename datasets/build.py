"""What a Parquet build does, without Ray: typed config, per-batch row loading, the manifest.

``defectforge.trainables.data_jobs`` runs these pieces over Ray Data.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from defectforge.datasets.contract import SCHEMA, SCHEMA_VERSION, SPLITS, combined_digest
from defectforge.datasets.errors import DataError
from defectforge.datasets.readers import (
    NEU_SEG_CLASSES,
    SampleRef,
    SampleSpec,
    discover_folder,
    discover_neu_seg,
    guess_channels,
    load_sample,
    read_class_file,
)
from defectforge.datasets.steel import SIMULATION_FILE, SteelOptions, discover_steel

SOURCES = ("neu-seg", "folder", "steel")
# Extra columns a load produces beside the contract; dropped before writing.
LOAD_COLUMNS = ("rejected", "input_digest", "pixel_sum", "pixel_sumsq")
LOAD_SCHEMA = (
    SCHEMA.append(pa.field("rejected", pa.string()))
    .append(pa.field("input_digest", pa.string()))
    .append(pa.field("pixel_sum", pa.list_(pa.float64())))
    .append(pa.field("pixel_sumsq", pa.list_(pa.float64())))
)


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides a dataset's content; saved in its manifest."""

    source: Literal["neu-seg", "folder", "steel"]
    root: str
    out: str
    name: str | None = None
    classes: tuple[str, ...] | None = None
    channels: int | None = None
    binary: bool = False
    mask_threshold: int | None = None
    mask_suffix: str = ""
    class_from_folder: bool = False
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    test_fraction: float = 0.0
    skip_bad: bool = False
    overwrite: bool = False
    steel: SteelOptions = field(default_factory=SteelOptions)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}; use one of {', '.join(SOURCES)}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"--channels must be 1 or 3, got {self.channels}")
        if (
            len(self.split_ratios) != 3
            or abs(sum(self.split_ratios) - 1) > 1e-6
            or min(self.split_ratios) < 0
        ):
            raise ValueError(
                f"--split-ratios must be three non-negative numbers summing to 1, "
                f"got {self.split_ratios}"
            )
        if not 0 <= self.test_fraction < 1:
            raise ValueError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        if self.mask_threshold is not None and not 1 <= self.mask_threshold <= 255:
            raise ValueError(f"--mask-threshold must be in 1..255, got {self.mask_threshold}")
        if self.classes is not None and len(self.classes) < 2:
            raise ValueError("--classes needs background plus at least one defect class")

    @property
    def dataset_name(self) -> str:
        return self.name or ("neu-seg" if self.source == "neu-seg" else Path(self.root).name)


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
        refs = discover_folder(
            cfg.root, cfg.dataset_name, cfg.split_ratios, cfg.mask_suffix, cfg.class_from_folder
        )
        file_classes, folder_classes = read_class_file(cfg.root)
        classes = cfg.classes or file_classes or _default_folder_classes(cfg, refs, folder_classes)
        channels = cfg.channels or guess_channels(refs[0].image_path)
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
    )
    return refs, spec


def _default_folder_classes(
    cfg: BuildConfig, refs: list[SampleRef], folder_classes: dict[str, str]
) -> tuple[str, ...]:
    if not cfg.class_from_folder:
        return ("background", "defect")
    named = sorted(
        {folder_classes.get(r.folder_class, r.folder_class) for r in refs} - {"background"}
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
    return None if value is None else str(value)


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
        "pixel_sum": [],
        "pixel_sumsq": [],
    }


def check_rejections(summary_rows: list[dict], cfg: BuildConfig, staging: Path) -> list[dict]:
    """Raise on the first bad file unless --skip-bad; with it, write rejected.csv. Return good rows."""
    rejected = [r for r in summary_rows if r["rejected"]]
    if rejected and not cfg.skip_bad:
        first = rejected[0]["rejected"]
        more = (
            f" ({len(rejected)} bad files in all; --skip-bad skips them and lists them in "
            "rejected.csv)"
            if len(rejected) > 1
            else ""
        )
        raise DataError(*_split_message(first, more))
    if rejected:
        with open(staging / "rejected.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "file", "reason"])
            for row in rejected:
                writer.writerow([row["id"], row["origin"], row["rejected"]])
    good = [r for r in summary_rows if not r["rejected"]]
    if not good:
        raise DataError(cfg.root, "every sample was rejected", "see rejected.csv for the reasons")
    return good


def _split_message(message: str, more: str) -> tuple[str, str, str]:
    path, _, rest = message.partition(": ")
    problem, _, fix = rest.partition("; ")
    return path, problem, fix + more


def make_manifest(cfg: BuildConfig, spec: SampleSpec, good: list[dict], n_rejected: int) -> dict:
    """Counts per split/source/class, train pixel statistics, input and content identities."""
    counts: dict[str, dict] = {}
    for split in SPLITS:
        rows = [r for r in good if r["split"] == split]
        counts[split] = {
            "total": len(rows),
            "by_source": dict(Counter(r["source"] for r in rows)),
            "by_class": dict(Counter(r["defect_class"] or "none" for r in rows)),
        }
    mean, std = pixel_statistics([r for r in good if r["split"] == "train"] or good, spec.channels)
    inputs_digest = combined_digest({r["id"]: r["input_digest"] for r in good})
    config = asdict(cfg)
    config["root"] = os.path.abspath(cfg.root)
    return {
        "schema_version": SCHEMA_VERSION,
        "dataset": spec.dataset,
        "source": cfg.source,
        "classes": list(spec.output_classes),
        "channels": spec.channels,
        "binary": spec.binary,
        "counts": counts,
        "rejected": n_rejected,
        "pixel_mean": mean,
        "pixel_std": std,
        "inputs": {"files": len(good), "digest": inputs_digest},
        "dataset_id": combined_digest({"inputs": inputs_digest, "spec": repr(spec)})[:16],
        "config": config,
        # `data simulate-steel` output must never pass for real data downstream.
        "simulated": (Path(cfg.root) / SIMULATION_FILE).is_file(),
    }


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

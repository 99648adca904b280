"""Pixel-identical images in one build ("twins"). Sets assembled from several captures hold them
(NEU-Seg has three pairs, two across its train and val folders, each pair with masks that
differ). A twin in a training split and one in a held-out split would score a model on an image
it learnt, so a build keeps each group of twins in one split: the most held-out split any of
them was given (test, then val, then train). A held-out split thereby keeps every image it was
given, and only training splits lose images to it."""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectforge.datasets.contract import SPLITS

TWINS_FILE = "twins.csv"


def pixel_digest(pixels: np.ndarray) -> str:
    """The identity of decoded pixels: equal for copies however the file was named or stored
    (a PNG and its re-save), different for a lossy re-encoding."""
    digest = hashlib.sha256(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()[:32]


@dataclass
class Twins:
    """The twin groups of a build and which of their images moved split."""

    groups: list[list[dict]] = field(default_factory=list)
    moved: dict[str, str] = field(default_factory=dict)  # sample id -> the split it joined

    @property
    def images(self) -> int:
        return sum(len(group) for group in self.groups)

    @property
    def masks_differ(self) -> int:
        """Groups whose images carry masks that are not the same: the labels disagree."""
        return sum(len({row["mask_digest"] for row in group}) > 1 for group in self.groups)

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["group", "id", "file", "given_split", "split", "masks_differ"])
            for number, group in enumerate(self.groups):
                differ = len({row["mask_digest"] for row in group}) > 1
                for row in group:
                    split = self.moved.get(row["id"], row["split"])
                    writer.writerow([number, row["id"], row["origin"], row["split"], split, differ])

    def counts(self) -> dict[str, int]:
        """What the manifest keeps of them (empty when there are none)."""
        if not self.groups:
            return {}
        return {
            "images": self.images,
            "groups": len(self.groups),
            "masks_differ": self.masks_differ,
            "moved": len(self.moved),
        }


def twins_warning(counts: dict[str, int]) -> str:
    """One line for a person from a manifest's twin counts ("" when there are none)."""
    if not counts:
        return ""
    differ = f", {counts['masks_differ']} with masks that differ" if counts["masks_differ"] else ""
    return (
        f"{counts['images']} images are pixel-identical copies of another ({counts['groups']} "
        f"groups{differ}); {counts['moved']} moved split so that each group is in one split "
        f"(listed in {TWINS_FILE}): remove the copies you do not want and build again"
    )


def settle_twins(good: list[dict]) -> tuple[list[dict], Twins]:
    """``good`` summary rows with each twin group in one split, and the groups found."""
    by_pixels: dict[str, list[dict]] = defaultdict(list)
    for row in good:
        by_pixels[row["pixel_digest"]].append(row)
    groups = sorted(
        (sorted(rows, key=lambda r: r["id"]) for rows in by_pixels.values() if len(rows) > 1),
        key=lambda rows: rows[0]["id"],
    )
    moved = {}
    for group in groups:
        split = max((row["split"] for row in group), key=SPLITS.index)
        moved.update({row["id"]: split for row in group if row["split"] != split})
    settled = [{**row, "split": moved.get(row["id"], row["split"])} for row in good]
    return settled, Twins(groups, moved)

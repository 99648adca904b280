"""Pixel-identical images in one build ("twins"). Sets assembled from several captures hold them
(NEU-Seg has three pairs, two across its train and val folders, each pair with masks that
differ). A twin in a training split and one in a held-out split would score a model on an image
it learnt, so a build keeps each group of twins in one split: the most held-out split any of
them was given (test, then val, then train), together with every image of their `--group-by`
groups. Train thereby loses images to the held-out splits, and val may lose some to test;
test never loses one.
"""

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
    """The twin groups of a build and which images moved split (twins, and the images of their
    `--group-by` groups, which go with them)."""

    groups: list[list[dict]] = field(default_factory=list)
    moved: dict[str, str] = field(default_factory=dict)  # sample id -> the split it joined
    companions: list[dict] = field(default_factory=list)  # moved with a twin of their group

    @property
    def images(self) -> int:
        return sum(len(group) for group in self.groups)

    @property
    def masks_differ(self) -> int:
        """Groups whose images carry masks that are not the same: the labels disagree."""
        return sum(_masks_differ(group) for group in self.groups)

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                ["group", "id", "file", "given_split", "split", "masks_differ", "reason"]
            )
            for number, group in enumerate(self.groups):
                for row in group:
                    writer.writerow(self._line(number, row, _masks_differ(group), "identical"))
            for row in self.companions:
                writer.writerow(self._line("", row, "", "in a --group-by group with a twin"))

    def _line(self, number, row: dict, differ, reason: str) -> list:
        split = self.moved.get(row["id"], row["split"])
        return [number, row["id"], row["origin"], row["split"], split, differ, reason]

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


def _masks_differ(group: list[dict]) -> bool:
    return len({row["mask_digest"] for row in group}) > 1


def twins_warning(counts: dict[str, int]) -> str:
    """One line for a person from a manifest's twin counts ("" when there are none)."""
    if not counts:
        return ""
    groups = f"{counts['groups']} group{'s' if counts['groups'] > 1 else ''}"
    differ = f", {counts['masks_differ']} with masks that differ" if counts["masks_differ"] else ""
    return (
        f"{counts['images']} images are pixel-identical copies of another ({groups}{differ}); "
        f"{counts['moved']} moved split so that each group, with its --group-by group, is in "
        f"one split (listed in {TWINS_FILE}): remove the copies you do not want and build again"
    )


def settle_twins(good: list[dict]) -> tuple[list[dict], Twins]:
    """``good`` summary rows with each twin group, and the `--group-by` groups its images are
    in (``split_group``), in one split; and the groups found."""
    by_pixels: dict[str, list[dict]] = defaultdict(list)
    for row in good:
        by_pixels[row["pixel_digest"]].append(row)
    groups = sorted(
        (sorted(rows, key=lambda r: r["id"]) for rows in by_pixels.values() if len(rows) > 1),
        key=lambda rows: rows[0]["id"],
    )
    moved: dict[str, str] = {}
    twin_ids = {row["id"] for group in groups for row in group}
    for component in _components_with_twins(good, groups):
        split = max((row["split"] for row in component), key=SPLITS.index)
        moved.update({row["id"]: split for row in component if row["split"] != split})
    companions = sorted(
        (row for row in good if row["id"] in moved and row["id"] not in twin_ids),
        key=lambda row: row["id"],
    )
    settled = [{**row, "split": moved.get(row["id"], row["split"])} for row in good]
    return settled, Twins(groups, moved, companions)


def _components_with_twins(good: list[dict], groups: list[list[dict]]) -> list[list[dict]]:
    """Rows joined by being twins or sharing a `--group-by` group, for each set so joined that
    holds twins (union-find over row ids)."""
    parent = {row["id"]: row["id"] for row in good}

    def root(sample_id: str) -> str:
        while parent[sample_id] != sample_id:
            parent[sample_id] = parent[parent[sample_id]]
            sample_id = parent[sample_id]
        return sample_id

    def join(rows: list[dict]) -> None:
        for row in rows[1:]:
            parent[root(row["id"])] = root(rows[0]["id"])

    for group in groups:
        join(group)
    by_split_group: dict[str, list[dict]] = defaultdict(list)
    for row in good:
        if row.get("split_group") is not None:
            by_split_group[row["split_group"]].append(row)
    for rows in by_split_group.values():
        join(rows)
    with_twins = {root(group[0]["id"]) for group in groups}
    components: dict[str, list[dict]] = defaultdict(list)
    for row in good:
        if root(row["id"]) in with_twins:
            components[root(row["id"])].append(row)
    return list(components.values())

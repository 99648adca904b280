"""A dataset's manifest, typed: what it holds, where it came from, and its identity.

Every dataset folder has one ``manifest.json``. A manifest is made in one of six ways: built
from raw files (``built``), or derived from others: ``subset``, ``augmented``, ``mixed``,
``labelled``, ``generated``. Each way records its details in a lineage section of the same name (``config``
for a build) and gives the dataset an id that changes exactly when its content would. Counts per
split are filled in by ``datasets.writer`` from the rows actually written.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from defectforge.core.errors import DataError
from defectforge.core.outputs import OUTPUT_RECORD
from defectforge.core.storage import Location
from defectforge.datasets.contract import MANIFEST, SCHEMA_VERSION, SPLITS, combined_digest

# Lineage sections, one per way a manifest is made.
LINEAGE = ("config", "subset", "augmentation", "mix", "labelling", "generation")


@dataclass(frozen=True)
class SplitCounts:
    total: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    by_class: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, sources: list[str], defect_classes: list[str | None]) -> SplitCounts:
        return cls(
            total=len(sources),
            by_source=dict(Counter(sources)),
            by_class=dict(Counter(c or "none" for c in defect_classes)),
        )


@dataclass(frozen=True)
class Manifest:
    dataset: str
    source: str  # neu-seg, folder, steel (real builds) or synthetic
    classes: tuple[str, ...]  # index = mask value
    channels: int
    binary: bool
    pixel_mean: tuple[float, ...]  # of the train split, in [0, 1]: every model's normalisation
    pixel_std: tuple[float, ...]
    dataset_id: str = ""
    masks: bool = True  # False for generated images that are not labelled yet
    counts: dict[str, SplitCounts] = field(default_factory=dict)
    rejected: int = 0
    missing_masks: int = 0  # images read as all background for want of a mask
    simulated: bool = False  # rendered stand-in data: never to pass for real data downstream
    inputs: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        # Lineage is kept in its JSON form, so a manifest equals itself read back from disk.
        for name in ("lineage", "inputs"):
            object.__setattr__(self, name, json.loads(_canonical(getattr(self, name))))

    # --- reading and writing -------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The JSON form: lineage sections at the top level, as in manifests of earlier versions."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lineage"}
        data["classes"] = list(self.classes)
        data["pixel_mean"], data["pixel_std"] = list(self.pixel_mean), list(self.pixel_std)
        data["counts"] = {split: asdict(c) for split, c in self.counts.items()}
        return {**data, **self.lineage}

    @classmethod
    def from_dict(cls, data: dict, where: str | Path = MANIFEST) -> Manifest:
        known = {f.name for f in fields(cls)} - {"lineage"}
        missing = sorted({"dataset", "classes", "channels", "dataset_id"} - set(data))
        if missing:
            raise DataError(
                where,
                f"manifest lacks {', '.join(missing)} (written by an older defectforge?)",
                "rebuild or regenerate the dataset with this version",
            )
        values = {k: v for k, v in data.items() if k in known}
        values["classes"] = tuple(data["classes"])
        values["pixel_mean"] = tuple(data.get("pixel_mean") or ())
        values["pixel_std"] = tuple(data.get("pixel_std") or ())
        values["binary"] = bool(data.get("binary", False))
        values["source"] = data.get("source", "synthetic")
        values["counts"] = {s: SplitCounts(**c) for s, c in data.get("counts", {}).items()}
        values["lineage"] = {k: data[k] for k in LINEAGE if k in data}
        return cls(**values)

    @classmethod
    def load(cls, root: str | Path | Location) -> Manifest:
        folder = Location.of(root)
        path = folder / MANIFEST
        if not path.is_file():
            raise DataError(
                path,
                "no manifest.json: not a defectforge dataset",
                "build it with `defectforge data build`",
            )
        if folder.remote and not (folder / OUTPUT_RECORD).is_file():
            # On a store the record is uploaded last: without it the upload did not finish.
            raise DataError(
                folder,
                f"the dataset's upload did not finish (no {OUTPUT_RECORD})",
                "run the command that writes it again",
            )
        try:
            data = json.loads(path.read_text())
        except (ValueError, OSError) as err:
            raise DataError(
                path, f"unreadable manifest ({type(err).__name__})", "rebuild the dataset"
            ) from None
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            version = data.get("schema_version") if isinstance(data, dict) else None
            raise DataError(
                path,
                f"schema version {version} is not {SCHEMA_VERSION}",
                "rebuild the dataset with this version of defectforge",
            )
        return cls.from_dict(data, path)

    # --- what it holds -------------------------------------------------------------------------

    def split_total(self, split: str) -> int:
        counts = self.counts.get(split)
        return counts.total if counts else 0

    def section(self, name: str) -> dict | None:
        return self.lineage.get(name)

    def require_masks(self, root: str | Path, use: str) -> None:
        if not self.masks:
            raise DataError(
                Location.of(root) / MANIFEST,
                f"these generated images have no masks yet, so they cannot be {use}",
                "label them with `defectforge synth label` and use the labelled folder",
            )

    # --- the six ways a manifest is made -----------------------------------------------------

    @classmethod
    def built(
        cls,
        config: dict,
        dataset: str,
        source: str,
        spec_identity: str,
        inputs_digest: str,
        **values,
    ) -> Manifest:
        """From raw files: ``config`` is the build's settings, ``spec_identity`` how samples were
        decoded; the id covers both and every input file."""
        return cls(
            dataset=dataset,
            source=source,
            dataset_id=_identity({"inputs": inputs_digest, "spec": spec_identity}),
            inputs={"digest": inputs_digest},
            lineage={"config": config},
            **values,
        )

    def subset(
        self, details: dict, pixel_mean: tuple[float, ...], pixel_std: tuple[float, ...]
    ) -> Manifest:
        """Some of the rows, listed by id in ``details``; normalisation from the kept train rows
        alone (the images left out may be test images now)."""
        derived = self._derived("subset", {**details, "parent": self.dataset_id})
        return replace(derived, pixel_mean=tuple(pixel_mean), pixel_std=tuple(pixel_std))

    def pasted(self, details: dict, data: str, train_ids: list[str]) -> Manifest:
        """Copy-paste images cut from this dataset's train rows (at ``data``): exact masks."""
        source = training_source("copy-paste source", data, self.dataset_id, train_ids)
        labelling = {
            "labeller": "copy-paste (exact masks)",
            "generator": "copy-paste",
            "config": details,
            "trained_on": [source],
        }
        derived = self._derived("labelling", labelling)
        return replace(derived, dataset=f"copy-paste-{self.dataset}", source="synthetic")

    def augmented(self, factor: int, strength: float, seed: int) -> Manifest:
        details = {"factor": factor, "strength": strength, "seed": seed, "parent": self.dataset_id}
        return self._derived("augmentation", details)

    def mixed(
        self,
        synthetic: Manifest,
        synthetic_ids: tuple[str, ...],
        details: dict,
        real_ids: tuple[str, ...] = (),
    ) -> Manifest:
        """Real rows (``real_ids``, or all) plus chosen synthetic ones; all real rows and no
        synthetic ones keep the real identity."""
        mix = {
            **details,
            "real_dataset_id": self.dataset_id,
            "synthetic_dataset_id": synthetic.dataset_id,
            "synthetic_labelling": {
                key: synthetic.section("labelling")[key]
                for key in ("labeller", "generator", "config")
            },
        }
        chosen = {
            "synthetic": repr(synthetic_ids),
            **({"real": repr(real_ids)} if real_ids else {}),
        }
        mixed = self._derived("mix", mix, identity=chosen)
        return mixed if synthetic_ids or real_ids else replace(mixed, dataset_id=self.dataset_id)

    def labelled(
        self, classes: tuple[str, ...], binary: bool, labelling: dict, **values
    ) -> Manifest:
        """Generated images with the labeller's masks (kept rows only)."""
        return replace(
            self,
            dataset=f"synthetic-{self.dataset}",
            classes=tuple(classes),
            binary=binary,
            masks=True,
            dataset_id=_identity(
                {"generated": self.dataset_id, "labelling": _canonical(labelling)}
            ),
            lineage={**self.lineage, "labelling": labelling},
            **values,
        )

    @classmethod
    def generated(
        cls, generator: str, classes: tuple[str, ...], channels: int, generation: dict
    ) -> Manifest:
        """Images from a generator, without masks; ``classes`` are the generator's data's."""
        return cls(
            dataset=f"gan-{generator}",
            source="synthetic",
            classes=tuple(classes),
            channels=channels,
            binary=False,
            pixel_mean=(),
            pixel_std=(),
            masks=False,
            dataset_id=_identity({"generator": generator, "generation": _canonical(generation)}),
            lineage={"generation": {"generator": generator, **generation}},
        )

    def _derived(self, step: str, details: dict, identity: dict | None = None) -> Manifest:
        return replace(
            self,
            dataset_id=_identity(
                {"parent": self.dataset_id, step: _canonical(details), **(identity or {})}
            ),
            lineage={**self.lineage, step: details},
        )


def training_source(role: str, data: str, dataset_id: str, train_ids: list[str] | None) -> dict:
    """A dataset a synthetic set's maker learnt from (or cut from), with the ids of its train
    split (None: not there to list); the leakage check reads these (``datasets.leakage``)."""
    return {"role": role, "data": data, "dataset_id": dataset_id, "train_ids": train_ids}


def _canonical(details: dict) -> str:
    return json.dumps(details, sort_keys=True, default=str)


def _identity(parts: dict[str, str]) -> str:
    return combined_digest(parts)[:16]


def empty_counts() -> dict[str, SplitCounts]:
    return {split: SplitCounts() for split in SPLITS}

"""A dataset's manifest, typed: what it holds, where it came from, and its identity.

Every dataset folder has one ``manifest.json``. A manifest is made in one of seven ways: built
from raw files (``built``), or derived from others: ``subsetted``, ``augmented``, ``mixed``,
``labelled``, ``combined``, ``generated``. Each way records its details in a lineage section
(``config`` for a build, ``subset``, ``augmentation``, ``mix``, ``labelling`` — a combination's
too —, ``generation``), a typed record below
written as a top-level key of the JSON, and gives the dataset an id that changes exactly when its
content would. Counts per split are filled in by ``datasets.writer`` from the rows actually written.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from defectforge.core.errors import DataError
from defectforge.core.outputs import OUTPUT_RECORD
from defectforge.core.storage import Location
from defectforge.datasets.contract import MANIFEST, SCHEMA_VERSION, SPLITS, combined_digest
from defectforge.datasets.lineage import (
    SECTIONS,
    AugmentationSection,
    GenerationSection,
    LabellingSection,
    MixSection,
    Section,
    SubsetSection,
    TrainingSource,
    canonical_json,
    json_form,
    require_keys,
)

# The source of every set of made images (generated, labelled, pasted, combined).
SYNTHETIC = "synthetic"


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
    twins: dict[str, int] = field(default_factory=dict)  # pixel-identical images (datasets.twins)
    input_bits: int = 8  # of the raw images, shifted to the 8 bits stored (data build --input-bits)
    simulated: bool = False  # rendered stand-in data: never to pass for real data downstream
    inputs: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    # Lineage (``SECTIONS``): None where the manifest was not made that way.
    config: dict[str, Any] | None = None
    subset: SubsetSection | None = None
    augmentation: AugmentationSection | None = None
    mix: MixSection | None = None
    labelling: LabellingSection | None = None
    generation: GenerationSection | None = None

    def __post_init__(self):
        # Kept in their JSON form, so a manifest equals itself read back from disk.
        for name in ("inputs", "config"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, json.loads(canonical_json(getattr(self, name))))

    # --- reading and writing -------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The JSON form: lineage sections at the top level (those it has), as in manifests of
        earlier versions."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in SECTIONS}
        data["classes"] = list(self.classes)
        data["pixel_mean"], data["pixel_std"] = list(self.pixel_mean), list(self.pixel_std)
        data["counts"] = {split: asdict(c) for split, c in self.counts.items()}
        # As manifests were written before twins were found and other bit depths were read.
        for name, unremarkable in (("twins", {}), ("input_bits", 8)):
            if data[name] == unremarkable:
                del data[name]
        for name in SECTIONS:
            section = getattr(self, name)
            if section is not None:
                data[name] = json_form(section)
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str | Path = MANIFEST) -> Manifest:
        known = {f.name for f in fields(cls)} - set(SECTIONS)
        require_keys(data, ["channels", "classes", "dataset", "dataset_id"], "manifest", where)
        values = {k: v for k, v in data.items() if k in known}
        values["classes"] = tuple(data["classes"])
        values["pixel_mean"] = tuple(data.get("pixel_mean") or ())
        values["pixel_std"] = tuple(data.get("pixel_std") or ())
        values["binary"] = bool(data.get("binary", False))
        values["source"] = data.get("source", SYNTHETIC)
        values["counts"] = {s: SplitCounts(**c) for s, c in data.get("counts", {}).items()}
        for name, section in SECTIONS.items():
            if data.get(name) is not None:
                values[name] = (
                    data[name] if section is None else section.from_dict(data[name], where)
                )
        return cls(**values)

    @classmethod
    def load(cls, root: str | Path | Location) -> Manifest:
        folder = Location.of(root)
        path = folder / MANIFEST
        if not path.is_file():
            folder.require_bucket()
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

    def require_masks(self, root: str | Path, use: str) -> None:
        if not self.masks:
            raise DataError(
                Location.of(root) / MANIFEST,
                f"these generated images have no masks yet, so they cannot be {use}",
                "label them with `defectforge synth label` and use the labelled folder",
            )

    # --- the seven ways a manifest is made -----------------------------------------------------

    @classmethod
    def built(
        cls,
        config: dict,
        dataset: str,
        source: str,
        spec_identity: str,
        inputs_digest: str,
        splits_digest: str,
        **values,
    ) -> Manifest:
        """From raw files: ``config`` is the build's settings, ``spec_identity`` how samples were
        decoded; the id covers both, every input file and which split each sample is in (the
        same files split otherwise are another dataset: a model of one may have learnt the
        other's test images)."""
        return cls(
            dataset=dataset,
            source=source,
            dataset_id=_identity(
                {"inputs": inputs_digest, "spec": spec_identity, "splits": splits_digest}
            ),
            inputs={"digest": inputs_digest},
            config=config,
            **values,
        )

    def subsetted(
        self,
        settings: dict,
        kept: dict[str, list[str]],
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
    ) -> Manifest:
        """Some of the rows, listed by id per split in ``kept`` (a split not there is kept
        whole); normalisation from the kept train rows alone (the images left out may be test
        images now). ``settings``: the subset's options."""
        ids = {f"{split}_ids": kept.get(split) for split in SPLITS}
        subset = SubsetSection(**ids, parent=self.dataset_id, settings=settings)
        derived = self._derived("subset", subset)
        return replace(derived, pixel_mean=tuple(pixel_mean), pixel_std=tuple(pixel_std))

    def pasted(self, settings: dict, data: str, train_ids: list[str]) -> Manifest:
        """Copy-paste images cut from this dataset's train rows (at ``data``): exact masks."""
        labelling = LabellingSection(
            labeller="copy-paste (exact masks)",
            generator="copy-paste",
            config=settings,
            trained_on=(TrainingSource("copy-paste source", data, self.dataset_id, train_ids),),
        )
        derived = self._derived("labelling", labelling)
        return replace(derived, dataset=f"copy-paste-{self.dataset}", source=SYNTHETIC)

    def augmented(self, factor: int, strength: float, seed: int) -> Manifest:
        augmentation = AugmentationSection(factor, strength, seed, parent=self.dataset_id)
        return self._derived("augmentation", augmentation)

    def mixed(
        self,
        synthetic: Manifest,
        synthetic_ids: tuple[str, ...],
        settings: dict,
        *,
        requested_ratio: float,
        achieved_ratio: float,
        real_images: int,
        real_ids: tuple[str, ...] = (),
    ) -> Manifest:
        """Real rows (``real_ids``, or all) plus chosen synthetic ones; all real rows and no
        synthetic ones keep the real identity. ``settings``: the mix's options but its ratio."""
        mix = MixSection(
            real_dataset_id=self.dataset_id,
            synthetic_dataset_id=synthetic.dataset_id,
            synthetic_labelling=synthetic.labelling.maker(),
            requested_ratio=requested_ratio,
            achieved_ratio=achieved_ratio,
            real_images=real_images,
            synthetic_images=len(synthetic_ids),
            settings=settings,
        )
        chosen = {
            "synthetic": repr(synthetic_ids),
            **({"real": repr(real_ids)} if real_ids else {}),
        }
        mixed = self._derived("mix", mix, identity=chosen)
        return mixed if synthetic_ids or real_ids else replace(mixed, dataset_id=self.dataset_id)

    def labelled(
        self, classes: tuple[str, ...], binary: bool, labelling: LabellingSection, **values
    ) -> Manifest:
        """Generated images with the labeller's masks (kept rows only)."""
        return replace(
            self,
            dataset=f"synthetic-{self.dataset}",
            classes=tuple(classes),
            binary=binary,
            masks=True,
            dataset_id=_identity(
                {"generated": self.dataset_id, "labelling": canonical_json(labelling.to_dict())}
            ),
            labelling=labelling,
            **values,
        )

    @classmethod
    def combined(cls, parts: list[Manifest], settings: dict) -> Manifest:
        """Labelled synthetic sets as one (``datasets.combine``, which checks that every part
        records its makers' sources): the makers of every part and everything they learnt from;
        pixel statistics of the union (every part gives as many rows)."""
        labelling = LabellingSection(
            labeller=" + ".join(part.labelling.labeller for part in parts),
            generator=" + ".join(str(part.labelling.generator) for part in parts),
            config={**settings, "sets": [part.dataset_id for part in parts]},
            trained_on=tuple(s for part in parts for s in part.labelling.trained_on),
        )
        first = parts[0]
        mean, std = _pooled_statistics(parts)
        return cls(
            dataset="combined-" + "+".join(part.dataset for part in parts),
            source=SYNTHETIC,
            classes=first.classes,
            channels=first.channels,
            binary=first.binary,
            pixel_mean=mean,
            pixel_std=std,
            dataset_id=_identity({"combined": canonical_json(labelling.to_dict())}),
            labelling=labelling,
        )

    @classmethod
    def generated(
        cls,
        generator: str,
        classes: tuple[str, ...],
        channels: int,
        settings: dict,
        gan_config: dict | None = None,
        input_bits: int = 8,
    ) -> Manifest:
        """Images from a generator, without masks; ``classes`` are the generator's data's,
        ``settings`` how it was asked (``GenerationSection``)."""
        generation = GenerationSection(generator, gan_config, settings=settings)
        how = {key: value for key, value in generation.to_dict().items() if key != "generator"}
        return cls(
            dataset=f"gan-{generator}",
            source=SYNTHETIC,
            classes=tuple(classes),
            channels=channels,
            binary=False,
            pixel_mean=(),
            pixel_std=(),
            masks=False,
            input_bits=input_bits,
            dataset_id=_identity({"generator": generator, "generation": canonical_json(how)}),
            generation=generation,
        )

    def _derived(self, step: str, details: Section, identity: dict | None = None) -> Manifest:
        return replace(
            self,
            twins={},  # counted by the build over its images, which a derived set does not all hold
            dataset_id=_identity(
                {
                    "parent": self.dataset_id,
                    step: canonical_json(details.to_dict()),
                    **(identity or {}),
                }
            ),
            **{step: details},
        )


def _pooled_statistics(parts: list[Manifest]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of equal shares of every part (none if a part has none)."""
    if any(not part.pixel_mean or not part.pixel_std for part in parts):
        return (), ()
    means = np.array([part.pixel_mean for part in parts])
    squares = np.array([part.pixel_std for part in parts]) ** 2 + means**2
    mean = means.mean(axis=0)
    std = np.sqrt(np.maximum(squares.mean(axis=0) - mean**2, 0.0))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def _identity(parts: dict[str, str]) -> str:
    return combined_digest(parts)[:16]


def empty_counts() -> dict[str, SplitCounts]:
    return {split: SplitCounts() for split in SPLITS}

"""A manifest's lineage sections, typed: how a dataset was made from others (``subset``,
``augmentation``, ``mix``, ``labelling``, ``generation``). The keys code reads are fields; every
other key of a section's JSON is kept in ``settings`` and written back flat beside them, so a
manifest reads and writes the same JSON it always did."""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from defectforge.core.errors import DataError
from defectforge.datasets.contract import MANIFEST


@dataclass(frozen=True)
class Section:
    """Base of a typed lineage record: the keys code reads are fields; every other key of its
    JSON is kept in ``settings`` and written flat beside them (for ``subset``, ``mix`` and
    ``generation``: the command's options, a copy of a config whose options change between
    versions, free-form by design), so a record writes back exactly what was read. A field made
    by ``_some_makers()`` is left out of the JSON while None (a key only some makers write)."""

    settings: dict[str, Any] = field(default_factory=dict, kw_only=True)
    # Fields that hold records (made from their JSON form on construction), not JSON values.
    nested: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        # JSON values are kept in their JSON form, so a record equals itself read back.
        for spec in fields(self):
            if spec.name not in self.nested:
                value = json.loads(canonical_json(getattr(self, spec.name)))
                object.__setattr__(self, spec.name, value)

    def to_dict(self) -> dict:
        data = dict(self.settings)
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name != "settings" and not (value is None and spec.metadata.get("omitted")):
                data[spec.name] = json_form(value)
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str | Path = MANIFEST):
        declared = {spec.name: spec for spec in fields(cls) if spec.name != "settings"}
        required = [name for name, spec in declared.items() if _required(spec)]
        require_keys(data, required, f"its {cls.__name__}", where)
        values = {key: value for key, value in data.items() if key in declared}
        settings = {key: value for key, value in data.items() if key not in declared}
        return cls(**values, settings=settings)

    @classmethod
    def of(cls, value: Section | dict):
        """A record from itself or its JSON form."""
        return value if isinstance(value, cls) else cls.from_dict(value)


def _some_makers() -> Any:
    """A field of a key only some makers write: None, and left out of the JSON, where absent."""
    return field(default=None, metadata={"omitted": True})


def _required(spec) -> bool:
    return spec.default is MISSING and spec.default_factory is MISSING


def require_keys(data: Any, keys: list[str], what: str, where: str | Path) -> None:
    """A DataError naming the ``keys`` that ``data`` (a manifest or a section) lacks."""
    missing = [key for key in keys if key not in data] if isinstance(data, dict) else keys
    if missing:
        raise DataError(
            where,
            f"{what} lacks {', '.join(missing)} (written by an older defectforge?)",
            "rebuild or regenerate the dataset with this version",
        )


def json_form(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, tuple):
        return [json_form(item) for item in value]
    return value


@dataclass(frozen=True)
class TrainingSource(Section):
    """A dataset a synthetic set's maker learnt from (or cut from), with the ids of its train
    split (None: not there to list); the leakage check reads these (``datasets.leakage``)."""

    role: str  # GAN, labeller or copy-paste source
    data: str
    dataset_id: str
    train_ids: list[str] | None = None  # None: not there to list, or not recorded (older)


@dataclass(frozen=True)
class SubsetSection(Section):
    """``subset``: the ids kept per split (None: that split kept whole) and the parent's id;
    ``settings``: the subset's options (``datasets.subset.SubsetConfig``)."""

    parent: str
    train_ids: list[str]
    val_ids: list[str] | None
    test_ids: list[str] | None


@dataclass(frozen=True)
class AugmentationSection(Section):
    """``augmentation``: the offline expansion of the parent's train split."""

    factor: int
    strength: float
    seed: int
    parent: str


@dataclass(frozen=True)
class LabellingSection(Section):
    """``labelling``: who drew a synthetic set's masks and from what it learnt. Every maker
    writes the first three; the pseudo-labeller (``trainables.synth``) all; a generator that
    draws masks also ``trained_on``, ``images``, ``kept``, ``dropped``; copy-paste ``trained_on``."""

    labeller: str
    generator: str | None
    config: dict[str, Any]  # the maker's options as given: free-form by design
    trained_on: tuple[TrainingSource, ...] | None = _some_makers()  # None: an older version
    images: int | None = _some_makers()
    kept: int | None = _some_makers()
    dropped: dict[str, int] | None = _some_makers()
    labeller_data_id: str | None = _some_makers()
    generated_dataset_id: str | None = _some_makers()
    size: list[int] | None = _some_makers()
    kept_ids_digest: str | None = _some_makers()
    confidence_quartiles: list[float] | None = _some_makers()
    nested = ("trained_on",)

    def __post_init__(self):
        if self.trained_on is not None:
            sources = tuple(TrainingSource.of(source) for source in self.trained_on)
            object.__setattr__(self, "trained_on", sources)
        super().__post_init__()

    def maker(self) -> LabellingSection:
        """Labeller, generator and config alone (what a mix records of its synthetic set)."""
        return LabellingSection(self.labeller, self.generator, self.config)


@dataclass(frozen=True)
class MixSection(Section):
    """``mix``: the real and synthetic sets mixed and how many of each; ``settings``: the mix's
    options but its ratio (``datasets.mix.MixConfig``), which is ``requested_ratio``."""

    real_dataset_id: str
    synthetic_dataset_id: str
    synthetic_labelling: LabellingSection
    requested_ratio: float
    achieved_ratio: float
    real_images: int
    synthetic_images: int
    nested = ("synthetic_labelling",)

    def __post_init__(self):
        object.__setattr__(
            self, "synthetic_labelling", LabellingSection.of(self.synthetic_labelling)
        )
        super().__post_init__()


@dataclass(frozen=True)
class GenerationSection(Section):
    """``generation``: the generator (a GAN run's identity, or ``folder-NAME``); ``settings``:
    how it was asked (seeds, truncation_psi, class; or a folder's path and files digest)."""

    generator: str
    gan_config: dict[str, Any] | None = _some_makers()  # the GAN's config as saved: free-form


# Lineage sections, one per way a manifest is made: a build's ``config`` is a copy of its
# options (``BuildConfig``, as given) and stays a dict, free-form by design.
SECTIONS: dict[str, type[Section] | None] = {
    "config": None,
    "subset": SubsetSection,
    "augmentation": AugmentationSection,
    "mix": MixSection,
    "labelling": LabellingSection,
    "generation": GenerationSection,
}


def canonical_json(details: Any) -> str:
    return json.dumps(details, sort_keys=True, default=str)

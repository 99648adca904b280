"""The stages a study spec may ask for before its search: how its data is made.

    data      a raw source, built as `data build` builds it (BuildConfig options)
    subset    a few-shot subset of it, as `data subset` draws it (train, val, rest_as_test, seed)
    labeller  a segmentation run trained on that data (`seg train` options), or {run: PATH}
    gan       a StyleGAN2 run on that data ({profile: ..., GanConfig options}), or {run: PATH}
    generate  images from the GAN (count, truncation, class, first seed)
    label     those images labelled by the labeller (`synth label` options)
    mask_gan  a StyleGAN2 run that draws each image's mask beside it (as gan; masks always on)
    generate_masks  images with their exact masks from mask_gan (as generate): no labeller
    copy_paste  the control arm: `synth copy-paste` images cut from the (subset) data's train split
    combine   two or more of those synthetic sets as one (`synth combine`): GAN and copy-paste
              images together
    export    the study's chosen model exported, optionally calibrated (target_recall, ...)

Every stage is optional; a spec that gives `dataset.real` (and `dataset.synthetic`) as paths
needs none. Each stage's output is identified by a key: a hash of the stage's own settings and
the keys (or dataset ids) of its inputs, so it changes exactly when what the stage would make
changes, and an output made once under a storage root is reused by every study that asks for it.
No Ray here: ``trainables.pipeline`` runs the stages.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from defectforge.core.config import TypedConfig, check_field, field_types, option
from defectforge.core.errors import ConfigError, one_line
from defectforge.datasets.build import BuildConfig
from defectforge.datasets.combine import CombineConfig
from defectforge.datasets.copy_paste import CopyPasteConfig
from defectforge.datasets.subset import SubsetConfig
from defectforge.gan.config import PROFILES, GanConfig, GenerateConfig
from defectforge.segmentation.config import SYNTHETIC_SOURCES, SegConfig
from defectforge.segmentation.decisions import CalibrationTarget
from defectforge.segmentation.pseudo_label import Corrections, LabelConfig
from defectforge.studies.errors import SpecError, with_fix

ORDER = (
    "data",
    "subset",
    "labeller",
    "gan",
    "generate",
    "label",
    "mask_gan",
    "generate_masks",
    "copy_paste",
    "combine",
    "export",
)
RUN_KEY = "run"
# The stage whose count bounds how many images of each synthetic source a pipeline makes.
COUNTED_BY = {"gan": "generate", "gan_masks": "generate_masks", "copy_paste": "copy_paste"}
# Set by the pipeline from other stages, never in the spec.
DERIVED = {
    "labeller": ("data",),
    "gan": ("data",),
    "mask_gan": ("data", "masks"),
    "label": ("images", "labeller"),
}


@dataclass(frozen=True)
class GenerateSpec(GenerateConfig):
    kind = "generate section"


# The sources a combine stage may join: every synthetic source but the combination itself.
COMBINABLE = tuple(source for source in SYNTHETIC_SOURCES if source != "combined")


@dataclass(frozen=True)
class CombineSpec(CombineConfig):
    kind = "combine section"

    sources: tuple[str, ...] = option(
        ("gan", "copy_paste"),
        "the synthetic sources whose sets are combined (synthetic_source names)",
        lambda v: (
            isinstance(v, tuple)
            and all(isinstance(s, str) for s in v)
            and len(v) >= 2
            and len(set(v)) == len(v)
            and set(v) <= set(COMBINABLE)
        ),
        f"two or more of {', '.join(COMBINABLE)}, each once",
        cli=False,
    )


@dataclass(frozen=True)
class ExportSpec(CalibrationTarget):
    kind = "export section"


@dataclass(frozen=True)
class Stages:
    data: BuildConfig | None = None
    subset: SubsetConfig | None = None
    labeller: dict | None = None  # {"run": path} or seg options
    gan: dict | None = None  # {"run": path} or {"profile": ..., GAN options}
    generate: GenerateSpec | None = None
    label: dict | None = None  # LabelConfig + Corrections options
    mask_gan: dict | None = None  # as gan; the pipeline turns masks on
    generate_masks: GenerateSpec | None = None
    copy_paste: CopyPasteConfig | None = None
    combine: CombineSpec | None = None
    export: ExportSpec | None = None

    def given(self) -> list[str]:
        return [name for name in ORDER if getattr(self, name) is not None]

    def made(self, name: str) -> bool:
        """Whether the pipeline makes this stage's output (rather than reading a given run)."""
        section = getattr(self, name)
        return section is not None and not (isinstance(section, dict) and RUN_KEY in section)

    def most_made(self, source: str) -> tuple[str, int, int] | None:
        """The spec key that bounds how many images of ``source`` these stages make, its value
        and that bound (None: a given set, or no stage makes it)."""
        if source != "combined":
            stage = COUNTED_BY[source]
            section = getattr(self, stage)
            return None if section is None else (f"{stage}.count", section.count, section.count)
        smallest_part = self._smallest_part()
        if smallest_part is None:
            return None
        key, value, smallest = smallest_part
        count_each = self.combine.count_each
        if count_each and count_each < smallest:
            key, value, smallest = "combine.count_each", count_each, count_each
        # each part gives as many as the smallest
        return key, value, len(self.combine.sources) * smallest

    def more_images_fix(self, source: str, needed: int | None = None) -> str:
        """The fix for a mix that asks for more images of ``source`` than these stages make,
        before the stages run (``needed`` known) or after: the count that bounds it first."""
        made = self.most_made(source)
        if made is None:
            return "lower the largest ratio or give a synthetic set with more images"
        key, value, _ = made
        fix = f"lower the largest ratio or raise {key} (now {value})"
        if source == "combined":
            parts = self._combined_parts()
            counts = ", ".join(f"{part} = {count}" for part, count, _ in parts)
            fix += f": each combined set gives as many as the smallest ({counts})"
            if needed is not None:
                fix += f", and {-(-needed // len(parts))} of each are needed"
        elif needed is not None:
            fix += f" to at least {needed}"
        if source != "copy_paste":
            fix += "; samples without a defect are not kept"
        return fix

    def combine_count_problem(self) -> tuple[str, str] | None:
        """A ``combine.count_each`` that the stages cannot fill (the problem and its fix), else
        None: a set never holds more images than its stage's count, so combining would fail
        after the GANs trained."""
        smallest_part = self._smallest_part()
        count_each = self.combine.count_each if smallest_part else 0
        if not count_each or count_each <= smallest_part[2]:
            return None
        key, value, smallest = smallest_part
        return (
            f"asks for more images of each set than {key} = {value} makes",
            f"set it to at most {smallest}, or 0 for as many as the smallest set holds",
        )

    def _combined_parts(self) -> list[tuple[str, int, int]] | None:
        if self.combine is None:
            return None
        parts = [self.most_made(part) for part in self.combine.sources]
        return None if None in parts else parts

    def _smallest_part(self) -> tuple[str, int, int] | None:
        parts = self._combined_parts()
        return None if parts is None else min(parts, key=lambda part: part[2])


TYPED_SECTIONS = {
    "data": BuildConfig,
    "subset": SubsetConfig,
    "generate": GenerateSpec,
    "generate_masks": GenerateSpec,
    "copy_paste": CopyPasteConfig,
    "combine": CombineSpec,
    "export": ExportSpec,
}


def _options_of(
    *classes: type[TypedConfig], skip: tuple[str, ...] = (), every: bool = False
) -> dict:
    """The options a section may set: the command line's (``every``: all but ``skip``)."""
    return {
        spec.name: (cls, spec)
        for cls in classes
        for spec in cls.options()
        if (every or spec.metadata.get("cli")) and spec.name not in skip
    }


def _checked_options(where: str, stage: str, values: dict, known: dict) -> dict:
    checked = {}
    for name, value in values.items():
        if name not in known:
            raise SpecError(
                f"{where}: {stage}.{name} = {value!r}: not a {stage} option; use one of "
                f"{sorted(known)}; fix it"
            )
        cls, spec = known[name]
        try:
            checked[name] = check_field(spec, value, field_types(cls)[name])
        except ConfigError as err:
            raise SpecError(with_fix(f"{where}: {stage}.{one_line(str(err))}")) from None
    return checked


def _run_or_options(where: str, stage: str, values: dict, known: dict) -> dict:
    if RUN_KEY in values:
        if set(values) != {RUN_KEY} or not isinstance(values[RUN_KEY], str):
            raise SpecError(
                f"{where}: {stage} = {values!r}: give either run: PATH (an existing run) or "
                "the options of a run to train, not both; fix it"
            )
        return {RUN_KEY: values[RUN_KEY]}
    return _checked_options(where, stage, values, known)


def _gan_options(where: str, stage: str, values: dict) -> dict:
    profile = values.get("profile", "cpu-small")
    if profile not in PROFILES:
        raise SpecError(
            f"{where}: {stage}.profile = {profile!r}: must be one of {', '.join(PROFILES)}; fix it"
        )
    rest = {k: v for k, v in values.items() if k != "profile"}
    # Network sizes too (z_dim, channel_base, ...): a spec may ask for any GAN the code builds.
    skip = ("channels", "classes", "data_manifest_id", *DERIVED[stage])
    known = _options_of(GanConfig, skip=skip, every=True)
    return {"profile": profile, **_run_or_options(where, stage, rest, known)}


def parse_stages(where: str, data: dict) -> Stages:
    """The stage sections of a spec (``data`` the whole spec mapping), each checked."""
    found: dict[str, Any] = {}
    for name in ORDER:
        values = data.get(name)
        if values is None and name in data:
            raise SpecError(
                f"{where}: {name} = None: the section is empty; write {name}: {{}} for its "
                f"defaults, or remove the {name}: line"
            )
        if values is None:
            continue
        if name == "export" and values is True:
            values = {}
        if not isinstance(values, dict):
            raise SpecError(
                f"{where}: {name} = {values!r}: must be a mapping of its options; write {name}: "
                f"followed by them ({name}: {{}} for the defaults), or remove it"
            )
        try:
            if name in TYPED_SECTIONS:
                found[name] = TYPED_SECTIONS[name].from_dict(values)
            elif name == "labeller":
                found[name] = _run_or_options(where, name, values, _options_of(SegConfig))
            elif name in ("gan", "mask_gan"):
                found[name] = _gan_options(where, name, values)
            else:
                known = _options_of(LabelConfig, Corrections, skip=DERIVED["label"])
                found[name] = _checked_options(where, name, values, known)
        except ConfigError as err:
            raise SpecError(with_fix(f"{where}: {name}: {one_line(str(err))}")) from None
    return Stages(**found)


def stage_key(name: str, settings: Any, inputs: dict[str, str]) -> str:
    """The identity of a stage's output: its name, settings and its inputs' identities."""
    text = json.dumps(
        {"stage": name, "settings": settings, "inputs": inputs}, sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def settings_of(section: Any) -> Any:
    """A stage section as plain data (for its key and its record)."""
    if isinstance(section, TypedConfig):
        return json.loads(section.to_json())
    return section

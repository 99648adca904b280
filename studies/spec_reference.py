"""The study spec reference page (docs/reference/spec.md), generated from the spec's section
classes (``studies.spec_schema``, ``studies.stages`` and the config classes the stages take
their options from): every key with its type, default, valid values and help text. Only public
structure is read: ``dataclasses.fields`` with the metadata ``core.config.option`` records, type
hints, and ``SegConfig.searchable()``. Read by the docs' MkDocs hook and by tests/test_docs.py."""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

import yaml

from defectforge.core.markdown import cell, code, table

# What the plain-dataclass top-level keys of a spec mean (StudySpec's fields carry no metadata).
TOP_LEVEL = {
    "name": "the study's name: its folder under `storage_path` and its Ray Job's name",
    "dataset": "the datasets the trials read (section below); paths, or made by the stages",
    "search_space": "the options a trial varies: fixed values, lists, ranges, `arms` (below)",
    "search": "how the space is searched: Optuna, a grid, or a comparison of arms (below)",
    "resources": "CPUs, GPUs and Ray Train workers per trial (below)",
    "training": "any other `seg train` option, fixed for every trial (below)",
    "storage_path": "where the study folder and the stages' outputs go: a folder, or an "
    "`s3://` / `gs://` URI on a cluster without a shared disk",
    "final": "the held-out final step: fresh seeds of the chosen configuration on test (below)",
    "description": "free text shown in the report",
    "expected_runtime": "free text per profile, e.g. `{cpu: 40 min}`; shown, never checked",
    "tracking": "experiment tracking: an MLflow server for every trial and the study (below)",
    "stages": "not a key itself: each stage (`data`, `subset`, ...) is a top-level key (below)",
}

# The stages whose section is a mapping rather than a config class: which classes' options
# they take. (Typed stages are read from ``Stages``' type hints.)
MAPPING_STAGES = {
    "labeller": "`run: PATH` (an existing `seg train` run), or the options of a run to train: "
    "every command-line option of [SegConfig](#segconfig)",
    "gan": "`run: PATH` (an existing `gan train` run), or `profile` (one of {profiles}; default "
    "`cpu-small`) and any option of [GanConfig](#ganconfig) but those set from the data stage "
    "(`data`, `channels`, `classes`)",
    "mask_gan": "as `gan`; `masks` is always on (the generator draws each image's mask)",
    "label": "the command-line options of [LabelConfig](#labelconfig) and "
    "[Corrections](#corrections) (`synth label`'s), side by side; `images` and `labeller` are "
    "set from the generate and labeller stages",
}
# The config classes those mapping stages read, as MAPPING_STAGES names them.
MAPPING_CLASSES = (
    ("defectforge.segmentation.config", "SegConfig"),
    ("defectforge.gan.config", "GanConfig"),
    ("defectforge.segmentation.pseudo_label", "LabelConfig"),
    ("defectforge.segmentation.pseudo_label", "Corrections"),
)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    text = str(annotation).replace("typing.", "").replace("NoneType", "None")
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    return re.sub(r"\b(?:[a-z_]\w*\.)+(\w+)", r"\1", text)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _yaml(value: Any) -> str:
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").strip()


def _field_default(spec: dataclasses.Field) -> str:
    if spec.default is not dataclasses.MISSING:
        value = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        value = spec.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return f"see [{type(value).__name__}](#{type(value).__name__.lower()})"
    return code(_yaml(value))


def _valid(spec: dataclasses.Field) -> str:
    choices = spec.metadata.get("choices")
    if choices:
        return "one of " + ", ".join(code(c) for c in choices)
    return cell(spec.metadata.get("valid", ""))


def _nested(annotation: Any) -> list[type]:
    """The dataclasses a field holds (``X``, ``X | None``)."""
    members = typing.get_args(annotation) or (annotation,)
    return [m for m in members if isinstance(m, type) and dataclasses.is_dataclass(m)]


# What a key means where its declaration has no help text (class name.field name).
FALLBACK_HELP = {
    "Range.low": "lower end",
    "Range.high": "upper end",
    "Range.log": "draw on a log scale (needs low > 0)",
}
FROM_DATA = "set from the dataset; not a spec key"


def _help_of(cls: type, spec: dataclasses.Field) -> str:
    text = spec.metadata.get("help", "") or FALLBACK_HELP.get(f"{cls.__name__}.{spec.name}", "")
    if not text and spec.metadata.get("cli") is False and not spec.metadata.get("searchable"):
        if cls.__name__ in ("SegConfig", "GanConfig"):
            text = FROM_DATA
    return text


def _class_table(cls: type, notes: dict[str, str] | None = None) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = []
    for spec in dataclasses.fields(cls):
        text = _help_of(cls, spec)
        nested = _nested(hints[spec.name])
        if nested:
            text = f"{text}; " if text else ""
            text = cell(text) + f"a mapping: [{nested[0].__name__}](#{nested[0].__name__.lower()})"
        else:
            text = cell(text)
        if notes and spec.name in notes:
            text = f"{text} ({notes[spec.name]})" if text else notes[spec.name]
        rows.append(
            (
                code(spec.name),
                code(_type_name(hints[spec.name])),
                _field_default(spec),
                _valid(spec),
                text,
            )
        )
    return table(("key", "type", "default", "valid", "what it is"), rows)


def _heading(level: int, text: str, cls: type) -> list[str]:
    return [f"{'#' * level} {text} {{#{cls.__name__.lower()}}}", ""]


def spec_classes() -> dict[str, list[type]]:
    """The spec's section classes, by the part of the page they belong to: the top level and
    its sections, the stages' typed sections, the classes mapping stages take options from, and
    every dataclass nested inside one of them."""
    import importlib

    from defectforge.studies import spec_schema as spec_module
    from defectforge.studies import stages as stages_module

    def with_nested(classes: list[type]) -> list[type]:
        found: list[type] = []
        waiting = list(classes)
        while waiting:
            cls = waiting.pop(0)
            if cls in found:
                continue
            found.append(cls)
            hints = typing.get_type_hints(cls)
            waiting += [n for f in dataclasses.fields(cls) for n in _nested(hints[f.name])]
        return found

    top_hints = typing.get_type_hints(spec_module.StudySpec)
    sections = [
        n
        for f in dataclasses.fields(spec_module.StudySpec)
        for n in _nested(top_hints[f.name])
        if n is not stages_module.Stages
    ]
    stage_hints = typing.get_type_hints(stages_module.Stages)
    typed = [
        n for f in dataclasses.fields(stages_module.Stages) for n in _nested(stage_hints[f.name])
    ]
    mapping = [getattr(importlib.import_module(m), name) for m, name in MAPPING_CLASSES]
    top = [spec_module.StudySpec, *with_nested(sections), spec_module.Range]
    stage_classes = [stages_module.Stages, *with_nested(typed)]
    options = [c for c in with_nested(mapping) if c not in stage_classes and c not in top]
    return {"top": top, "stages": stage_classes, "options": options}


def _section_key(cls: type) -> str:
    """The spec key a top-level section class sits under (``search.asha`` for AshaSpec)."""
    from defectforge.studies import spec_schema as spec_module

    def walk(owner: type, prefix: str) -> str | None:
        hints = typing.get_type_hints(owner)
        for f in dataclasses.fields(owner):
            for nested in _nested(hints[f.name]):
                key = f"{prefix}{f.name}"
                if nested is cls:
                    return key
                deeper = walk(nested, key + ".")
                if deeper:
                    return deeper
        return None

    return walk(spec_module.StudySpec, "") or cls.__name__


def spec_reference() -> str:
    """The study spec reference page, from the spec's section classes."""
    from defectforge.gan.config import PROFILES
    from defectforge.segmentation.config import SegConfig
    from defectforge.studies import spec_schema as spec_module
    from defectforge.studies import stages as stages_module

    classes = spec_classes()
    lines = [
        "# Study spec",
        "",
        "Generated from the spec's section classes (`defectforge.studies.spec_schema`,",
        "`defectforge.studies.stages` and the configs whose options they take) each time the",
        "documentation is built. A spec is YAML; every value is checked by its option's own check",
        "when the spec loads, and a mistake stops the study before any stage or trial runs,",
        "naming the file, the key, the value and the fix. How specs are used:",
        "[Studies and specs](../studies.md).",
        "",
        "## Top level {#studyspec}",
        "",
    ]
    hints = typing.get_type_hints(spec_module.StudySpec)
    rows = []
    for f in dataclasses.fields(spec_module.StudySpec):
        rows.append(
            (
                code(f.name),
                code(_type_name(hints[f.name])),
                _field_default(f),
                "",
                TOP_LEVEL.get(f.name, ""),
            )
        )
    lines += table(("key", "type", "default", "valid", "what it is"), rows)

    searchable = SegConfig.searchable()
    seg_hints = typing.get_type_hints(SegConfig)
    lines += [
        "## search_space {#search-space}",
        "",
        "Each key is a searchable option of [SegConfig](#segconfig). An entry is a fixed value,",
        "a list (the choices; a grid's values) or a range `{low: 0.05, high: 0.5, log: false}`",
        "([Range](#range); numbers only). `arms` is a list of mappings of these keys, one value",
        "each, crossed with the other lists like one more grid key (a grid or compare search",
        "only). A key is in `search_space` or in `training`, not both.",
        "",
    ]
    rows = [
        (
            code(name),
            code(_type_name(seg_hints[name])),
            _field_default(f),
            _valid(f),
            cell(_help_of(SegConfig, f)),
        )
        for name, f in searchable.items()
    ]
    rows.append(
        (
            code("arms"),
            code("list[dict]"),
            "",
            "mappings of the keys above",
            "the arms of a grid or compare study",
        )
    )
    lines += table(("key", "type", "default", "valid", "what it is"), rows)

    owned = set(spec_module.STUDY_OWNED)
    training = [
        f.name for f in SegConfig.options() if f.metadata.get("cli") and f.name not in owned
    ]
    lines += [
        "## training {#training}",
        "",
        "Any of these [SegConfig](#segconfig) options, fixed for every trial: "
        + ", ".join(code(n) for n in training)
        + ".",
        "",
    ]
    if owned:
        lines += [
            "The study sets " + ", ".join(code(n) for n in sorted(owned)) + " itself, from its",
            "`dataset` and `resources` sections.",
            "",
        ]

    for cls in classes["top"]:
        if cls is spec_module.StudySpec:
            continue
        key = _section_key(cls) if cls.__name__ != "Range" else "a range"
        lines += _heading(2, f"{key} ({cls.__name__})", cls)
        doc = (cls.__doc__ or "").strip()
        if doc and not doc.startswith(cls.__name__ + "("):
            lines += [cell(doc.split("\n\n")[0]), ""]
        lines += _class_table(cls)

    lines += [
        "## Stages {#stages}",
        "",
        "Each stage is a top-level key of the spec, every one optional; they run in this order,",
        "and a stage whose output exists under `storage_path` (same settings, same inputs) is",
        "reused. `export: true` exports with no calibration.",
        "",
    ]
    stage_hints = typing.get_type_hints(stages_module.Stages)
    rows = []
    for f in dataclasses.fields(stages_module.Stages):
        nested = _nested(stage_hints[f.name])
        if nested:
            what = f"the options of [{nested[0].__name__}](#{nested[0].__name__.lower()})"
        else:
            what = MAPPING_STAGES.get(f.name, "a mapping").format(
                profiles=", ".join(code(p) for p in PROFILES)
            )
        rows.append((code(f.name), what))
    lines += table(("stage", "its section"), rows)
    for cls in classes["stages"]:
        if cls is stages_module.Stages:
            continue
        lines += _heading(3, cls.__name__, cls)
        lines += _class_table(cls)

    lines += [
        "## Option classes {#option-classes}",
        "",
        "The configs the `labeller`, `gan`, `mask_gan` and `label` stages, `training` and",
        "`search_space` take their options from; every field is listed, including those set from",
        "the data (marked so: no flag, no spec key).",
        "",
    ]
    for cls in classes["options"]:
        lines += _heading(3, cls.__name__, cls)
        notes = None
        if cls.__name__ == "GanConfig":
            notes = {
                name: "; ".join(f"{_yaml(v)} with `profile: {p}`" for p, v in profiles.items())
                for name, profiles in _by_option(PROFILES).items()
            }
        lines += _class_table(cls, notes)
    return "\n".join(lines).rstrip() + "\n"


def _by_option(profiles: dict[str, dict]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for profile, values in profiles.items():
        for name, value in values.items():
            found.setdefault(name, {})[profile] = value
    return found

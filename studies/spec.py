"""A study spec: what to search, how, on which data and resources, and the held-out final check.

Specs are YAML, typed here and checked when loaded: an error names the file, the key, the value
and the fix (``SpecError``), before any Ray work starts.

- ``search_space``: the options a trial varies. Its keys are the segmentation options declared
  searchable in ``SegConfig``; an entry is a fixed value, a list (choices; the grid's values), or
  a range ``{low: .., high: .., log: true}``. Every value is checked by the option's own check.
  ``arms``: a list of mappings of such options, each one point (e.g. ``{synthetic_ratio: 0.5,
  real_count: 100}``), crossed with the other lists like one more grid key.
- ``training``: any `seg train` option fixed for every trial (``crop_size``,
  ``max_steps_per_epoch``, ...), checked the same way; a key is in one of the two, not both.
- ``dataset``, ``search``, ``resources``, ``final``: typed sections of their own.
"""

from __future__ import annotations

import json
import re
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

import yaml

from defectforge.core.config import TypedConfig, check_field, field_types
from defectforge.core.errors import ConfigError, one_line
from defectforge.core.outputs import NAME_RULE, name_problem
from defectforge.segmentation.config import SegConfig
from defectforge.studies.errors import SpecError, with_fix
from defectforge.studies.spec_schema import (
    ARMS,
    DEFAULT_SPACE,
    MIX_DEFAULTS,
    MOVED_TO_TRAINING,
    SOURCE_DATASETS,
    SOURCE_STAGES,
    STUDY_OWNED,
    DatasetSpec,
    FinalSpec,
    Range,
    ResourcesSpec,
    SearchSpec,
    StudySpec,
    TrackingSpec,
)
from defectforge.studies.stages import ORDER, parse_stages, settings_of

SECTIONS = {
    "dataset": DatasetSpec,
    "search": SearchSpec,
    "resources": ResourcesSpec,
    "final": FinalSpec,
    "tracking": TrackingSpec,
}


def _section(where: str, key: str, values: Any, cls: type[TypedConfig]):
    """Build section ``cls`` from mapping ``values``: unknown keys, types and checks refused."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise SpecError(where, key, values, "must be a mapping", f"write {key}: followed by keys")
    if key == "dataset":
        _refuse_moved_keys(where, values)
    try:
        return cls.from_dict(values)
    except ConfigError as err:
        raise _spec_error(where, key, err) from None


def _spec_error(where: str, section: str, err: ConfigError) -> SpecError:
    """``<file>: <section>.<option> = <value>: <problem>`` from an option's ConfigError."""
    text = one_line(str(err))
    joint = "." if re.match(r"[\w.]+ = ", text) else ": "
    return SpecError(with_fix(f"{where}: {section}{joint}{text}"))


def _refuse_moved_keys(where: str, values: dict) -> None:
    for name in MOVED_TO_TRAINING:
        if name in values:
            raise SpecError(
                where,
                f"dataset.{name}",
                values[name],
                "is a training option now",
                f"move it under training: ({name}: {values[name]})",
            )


def _option_fields() -> dict[str, Field]:
    """The segmentation options a spec may fix in training: (not data, not set by the study)."""
    return {
        f.name: f
        for f in SegConfig.options()
        if f.metadata.get("cli") and f.name not in STUDY_OWNED
    }


def _checked_option(where: str, key: str, spec: Field, value: Any) -> Any:
    try:
        return check_field(spec, value, field_types(SegConfig)[spec.name])
    except ConfigError as err:
        raise _spec_error(where, key.rsplit(".", 1)[0], err) from None


def _training(where: str, values: Any) -> dict[str, Any]:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SpecError(where, "training", values, "must be a mapping", "write option: value lines")
    known = _option_fields()
    checked = {}
    for name, value in values.items():
        if name in MIX_DEFAULTS:
            # The study plans every trial's mix from the search space (and final.baseline).
            raise SpecError(
                where,
                f"training.{name}",
                value,
                "a trial's mix is set in search_space",
                f"move it there: search_space: {{{name}: {value}}}",
            )
        if name not in known:
            raise SpecError(
                where,
                f"training.{name}",
                value,
                "not a training option",
                f"use one of {sorted(known)}",
            )
        checked[name] = _checked_option(where, f"training.{name}", known[name], value)
    return checked


def _space_entry(where: str, key: str, value: Any) -> Any:
    searchable = SegConfig.searchable()
    if key not in searchable:
        raise SpecError(
            where, f"search_space.{key}", value, "not a searchable key", f"use {sorted(searchable)}"
        )
    spec = searchable[key]
    kind = field_types(SegConfig)[key]

    def check(item: Any) -> Any:
        return _checked_option(where, f"search_space.{key}", spec, item)

    if isinstance(value, dict):
        if set(value) - {"low", "high", "log"} or not {"low", "high"} <= set(value):
            raise SpecError(
                where,
                f"search_space.{key}",
                value,
                "a range needs exactly low, high and optionally log",
                "write {low: 0.0, high: 0.5}",
            )
        if kind is str:
            raise SpecError(
                where, f"search_space.{key}", value, "text keys cannot be ranges", "give a list"
            )
        low, high = check(value["low"]), check(value["high"])
        if not low < high:
            raise SpecError(where, f"search_space.{key}", value, "low must be < high", "swap them")
        if not isinstance(value.get("log", False), bool):
            raise SpecError(
                where, f"search_space.{key}", value, "log must be true or false", "write log: true"
            )
        if value.get("log") and low <= 0:
            raise SpecError(
                where, f"search_space.{key}", value, "a log range needs low > 0", "raise low"
            )
        return Range(low, high, bool(value.get("log", False)))
    if isinstance(value, list):
        if not value:
            raise SpecError(where, f"search_space.{key}", value, "empty list", "give values")
        return [check(item) for item in value]
    return check(value)


def _arms(where: str, value: Any, space: dict) -> list[dict]:
    """``search_space.arms``: a non-empty list of mappings of searchable options to one value."""
    key = f"search_space.{ARMS}"
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(a, dict) and a for a in value)
    ):
        raise SpecError(
            where,
            key,
            value,
            "must be a list of mappings, one per arm",
            "write e.g. - {synthetic_ratio: 0.38, synthetic_source: gan}",
        )
    arms = []
    for arm in value:
        for name in set(arm) & set(space):
            raise SpecError(
                where, f"{key}.{name}", arm[name], "also a search_space key", "keep it in one place"
            )
        checked = {name: _space_entry(where, name, item) for name, item in arm.items()}
        for name, item in checked.items():
            if isinstance(item, list | Range):
                raise SpecError(
                    where, f"{key}.{name}", arm[name], "an arm holds one value per key", "give one"
                )
        if not checked.get("synthetic_ratio") and {"synthetic_source", "real_count"} & set(checked):
            raise SpecError(
                where,
                key,
                arm,
                "an arm with synthetic_ratio 0 mixes nothing in",
                "drop its synthetic_source and real_count",
            )
        arms.append(checked)
    if len({json.dumps(arm, sort_keys=True) for arm in arms}) < len(arms):
        raise SpecError(where, key, value, "lists an arm twice", "keep one of each")
    return arms


def _search_space(where: str, space: dict) -> dict:
    entries = {k: _space_entry(where, k, v) for k, v in space.items() if k != ARMS}
    arms = _arms(where, space[ARMS], space) if ARMS in space else []
    in_arms = {key for arm in arms for key in arm}
    defaults = {k: v for k, v in DEFAULT_SPACE.items() if k not in in_arms}
    return {**defaults, **entries, **({ARMS: arms} if arms else {})}


def _text_mapping(where: str, key: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(where, key, value, "must be a mapping", f"write {key}: followed by keys")
    return {str(k): str(v) for k, v in value.items()}


def parse_spec(data: Any, where: str = "spec") -> StudySpec:
    if data is None:
        raise SpecError(f"{where}: the spec is empty; write one (ready ones: studies/specs/)")
    if not isinstance(data, dict):
        raise SpecError(where, "(top)", data, "a spec is a mapping", "see studies/specs/")
    known = ({f.name for f in fields(StudySpec)} - {"stages"}) | set(ORDER)
    for key in data:
        if key not in known:
            raise SpecError(where, key, data[key], "unknown key", f"use one of {sorted(known)}")
    for key in ("name", "search_space"):
        if key not in data:
            raise SpecError(where, key, None, "missing", f"add a {key} section")
    if problem := name_problem(str(data["name"])):
        raise SpecError(where, "name", data["name"], problem, f"give {NAME_RULE}")
    space = data["search_space"]
    if not isinstance(space, dict):
        raise SpecError(where, "search_space", space, "must be a mapping", "key: value lines")
    sections = {key: _section(where, key, data.get(key), cls) for key, cls in SECTIONS.items()}
    training = _training(where, data.get("training"))
    for key in set(training) & set(space):
        raise SpecError(
            where, f"training.{key}", training[key], "also in search_space", "keep it in one place"
        )
    spec = StudySpec(
        name=_text(where, data, "name", None),
        search_space=_search_space(where, space),
        training=training,
        storage_path=_text(where, data, "storage_path", "runs/studies"),
        description=_text(where, data, "description", "") if data.get("description") else "",
        expected_runtime=_text_mapping(where, "expected_runtime", data.get("expected_runtime")),
        stages=parse_stages(where, data),
        **sections,
    )
    _check_consistency(where, spec)
    return spec


def _text(where: str, data: dict, key: str, default: str | None) -> str:
    """A top-level text key; left out, its default (None: required)."""
    value = data.get(key, default)
    if not isinstance(value, str):
        raise SpecError(
            where,
            key,
            value,
            "must be text",
            f"write {key}: followed by text" + ("" if default is None else ", or remove the line"),
        )
    return value


def _check_consistency(where: str, spec: StudySpec) -> None:
    algorithm = spec.search.algorithm
    if algorithm in ("grid", "compare"):
        for key, value in spec.searched().items():
            if isinstance(value, Range):
                raise SpecError(
                    where,
                    f"search_space.{key}",
                    value,
                    f"a {algorithm} search needs lists, not ranges",
                    "list the values or use algorithm: optuna",
                )
    if algorithm == "grid" and spec.search.optuna_storage:
        raise SpecError(
            where,
            "search.optuna_storage",
            spec.search.optuna_storage,
            "a grid search keeps no Optuna study",
            "remove it, or use algorithm: optuna",
        )
    if algorithm not in ("grid", "compare") and ARMS in spec.search_space:
        raise SpecError(
            where,
            "search.algorithm",
            algorithm,
            "search_space.arms need a grid",
            "use algorithm: grid or compare",
        )
    if algorithm == "compare":
        _check_compare(where, spec)
    _check_baseline(where, spec)
    _check_synthetic_sources(where, spec)
    if not (spec.dataset.real or spec.stages.data):
        raise SpecError(
            where, "dataset.real", None, "missing", "give a built dataset, or a data stage"
        )
    _check_stage_inputs(where, spec)


def _check_baseline(where: str, spec: StudySpec) -> None:
    """One value per searchable key, and seeds to pair the two configurations by."""
    searchable = SegConfig.searchable()
    for key, value in spec.final.baseline.items():
        if key not in searchable or key == "seed" or isinstance(value, list | dict):
            raise SpecError(
                where,
                f"final.baseline.{key}",
                value,
                "the baseline takes one value of a searchable key",
                f"use one of {sorted(set(searchable) - {'seed'})}, each with one value (the "
                "baseline runs the final step's seeds)",
            )
        _checked_option(where, f"final.baseline.{key}", searchable[key], value)
    if "epochs" in spec.final.baseline and spec.final.epochs:
        raise SpecError(
            where,
            "final.baseline.epochs",
            spec.final.baseline["epochs"],
            f"final.epochs = {spec.final.epochs} already sets the epochs of the chosen "
            "configuration and its baseline alike",
            "remove one of the two",
        )
    if spec.final.baseline and (not spec.final.seeds or spec.search.algorithm == "compare"):
        raise SpecError(
            where,
            "final.baseline",
            spec.final.baseline,
            "the chosen configuration meets its baseline on the final step's seeds",
            "set final.seeds: 3 (a compare study compares its arms instead: add an arm)",
        )


def _check_compare(where: str, spec: StudySpec) -> None:
    search = spec.search
    unused = {
        "asha": (search.asha, None),
        "num_samples": (search.num_samples, 1),
        "optuna_storage": (search.optuna_storage, ""),
    }
    for key, (value, default) in unused.items():
        if value != default:
            raise SpecError(
                where,
                f"search.{key}",
                value,
                "a compare study trains every arm with every seed to the end; it searches nothing",
                "remove it",
            )
    if "seed" in spec.search_space:
        raise SpecError(
            where,
            "search_space.seed",
            spec.search_space["seed"],
            "a compare study draws its seeds itself (final.seeds per arm, the same for every arm)",
            "remove it and set final.seeds",
        )
    if not spec.final.seeds:
        raise SpecError(
            where, "final.seeds", 0, "a compare study needs seeds per arm", "set final.seeds: 3"
        )


def _check_synthetic_sources(where: str, spec: StudySpec) -> None:
    """Every synthetic set a trial may mix in, or a combine stage joins, is given or made by a
    stage."""
    for source in sorted(spec.synthetic_sources()):
        _check_source_set(
            where, spec, source, f"synthetic_source {source} with synthetic_ratio > 0"
        )
    if spec.stages.combine is not None and not spec.dataset.combined:
        for source in spec.stages.combine.sources:
            _check_source_set(where, spec, source, f"the combine stage's source {source}")


def _check_source_set(where: str, spec: StudySpec, source: str, user: str) -> None:
    key = SOURCE_DATASETS[source]
    stage, fix = SOURCE_STAGES[source]
    if not (getattr(spec.dataset, key) or getattr(spec.stages, stage)):
        raise SpecError(
            where,
            f"dataset.{key}",
            getattr(spec.dataset, key),
            f"{user} needs this dataset",
            f"set dataset.{key} to a {fix}",
        )


# A stage that trains for minutes to hours is refused when no later stage reads what it makes.
STAGE_USERS = {
    "labeller": ("label", "masks GAN images with it", "add generate and label stages"),
    "gan": ("generate", "draws images from it", "add generate: {count: N}"),
    "mask_gan": ("generate_masks", "draws from it", "add generate_masks: {count: N}"),
}


def _check_stage_inputs(where: str, spec: StudySpec) -> None:
    """Every stage needs what it is made from: given, or made by an earlier stage."""
    stages = spec.stages
    needs = {
        "generate": ("gan",),
        "label": ("generate", "labeller"),
        "generate_masks": ("mask_gan",),
    }
    for stage, inputs in needs.items():
        for needed in inputs if getattr(stages, stage) is not None else ():
            if getattr(stages, needed) is None:
                raise SpecError(
                    where,
                    stage,
                    settings_of(getattr(stages, stage)),
                    f"needs a {needed} section (options to make it, or run: PATH)",
                    f"add {needed}:",
                )
    for made, (user, use, fix) in STAGE_USERS.items():
        if getattr(stages, made) is not None and getattr(stages, user) is None:
            raise SpecError(
                where,
                made,
                settings_of(getattr(stages, made)),
                f"nothing uses it: only a {user} stage {use}",
                f"{fix}, or remove {made}",
            )
    if stages.combine is not None and "combined" not in spec.synthetic_sources():
        raise SpecError(
            where,
            "combine",
            settings_of(stages.combine),
            "nothing uses its set: no trial mixes in synthetic_source combined",
            "add an arm or value with synthetic_source: combined and a ratio > 0, or remove "
            "combine",
        )
    problem = stages.combine_count_problem()
    if problem:
        raise SpecError(where, "combine.count_each", stages.combine.count_each, *problem)
    for source, (stage, _) in SOURCE_STAGES.items():
        key = SOURCE_DATASETS[source]
        if getattr(stages, stage) and getattr(spec.dataset, key):
            raise SpecError(
                where,
                f"dataset.{key}",
                getattr(spec.dataset, key),
                f"given, and also made by the {stage} stage",
                "keep one of the two",
            )


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last one
    without a word: a second search: block would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_spec(path: str | Path) -> StudySpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), "(file)", str(path), "no such spec file", "check the path")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - safe loader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = one_line(getattr(err, "problem", None) or str(err))
        raise SpecError(f"{path}: not valid YAML at {at}: {problem}; fix the syntax") from None
    return parse_spec(data, str(path))

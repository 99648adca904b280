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
from dataclasses import Field, dataclass, field, fields
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from defectforge.core.config import TypedConfig, check_field, field_types, option
from defectforge.core.errors import ConfigError, one_line
from defectforge.core.outputs import NAME_RULE, name_problem
from defectforge.segmentation.config import SegConfig
from defectforge.studies.errors import SpecError, with_fix
from defectforge.studies.stages import ORDER, Stages, parse_stages, settings_of

# compare: no search; every grid point is an arm trained with final.seeds seeds and scored on test.
ALGORITHMS = ("optuna", "grid", "compare")
ARMS = "arms"
# What decides a trial's training data, and each one's value when a spec does not set it.
# A trial's mix point, in the order its values are checked, with SegConfig's defaults.
MIX_DEFAULTS = {
    name: next(spec.default for spec in SegConfig.options() if spec.name == name)
    for name in ("synthetic_ratio", "synthetic_source", "real_count")
}
RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
DEFAULT_SPACE = {"synthetic_ratio": 0.0}
# Options a study sets itself, from its data and resources sections.
STUDY_OWNED = ("workers", "use_gpu", "synthetic", "data_manifest_id")
# Keys earlier specs put under dataset:, now training: options like the others.
MOVED_TO_TRAINING = ("image_size", "crop_size", "binary")


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class DatasetSpec(TypedConfig):
    kind = "dataset section"

    real: str = option("", "the real dataset (`data build`); made by the data stage if absent")
    synthetic: str = option(
        "", "a labelled synthetic set (`synth label`) for ratios > 0; or made by the label stage"
    )
    copy_paste: str = option(
        "", "a copy-paste set (`synth copy-paste`) for synthetic_source copy_paste; or its stage"
    )
    gan_masks: str = option(
        "",
        "images and masks drawn by a `gan train --masks` run (`gan generate`) for "
        "synthetic_source gan_masks; or made by the mask_gan and generate_masks stages",
    )


# The dataset each synthetic source mixes in, and what makes it when a spec gives no path.
SOURCE_DATASETS = {"gan": "synthetic", "copy_paste": "copy_paste", "gan_masks": "gan_masks"}
SOURCE_STAGES = {
    "gan": ("label", "`synth label` output, or add generate and label stages"),
    "copy_paste": ("copy_paste", "`synth copy-paste` output, or add a copy_paste stage"),
    "gan_masks": (
        "generate_masks",
        "`gan generate` output of a --masks run, or add mask_gan and generate_masks stages",
    ),
}


@dataclass(frozen=True)
class AshaSpec(TypedConfig):
    kind = "asha section"

    grace_period: int = option(1, check=lambda v: v >= 1, valid=">= 1")
    reduction_factor: int = option(2, check=lambda v: v >= 2, valid=">= 2")


@dataclass(frozen=True)
class SearchSpec(TypedConfig):
    kind = "search section"

    algorithm: str = option("optuna", choices=ALGORITHMS)
    num_samples: int = option(1, check=lambda v: v >= 1, valid=">= 1")
    max_concurrent_trials: int = option(1, check=lambda v: v >= 1, valid=">= 1")
    seed: int = option(0)
    asha: AshaSpec | None = option(None)
    optuna_storage: str = option("")


def _custom_resources_ok(custom: dict) -> bool:
    return all(
        isinstance(name, str)
        and name not in RESERVED_RESOURCES
        and isinstance(amount, int | float)
        and not isinstance(amount, bool)
        and amount > 0
        for name, amount in custom.items()
    )


@dataclass(frozen=True)
class ResourcesSpec(TypedConfig):
    kind = "resources section"

    cpus_per_trial: float = option(1.0, check=lambda v: v > 0, valid="> 0")
    gpus_per_trial: float = option(0.0, check=lambda v: v >= 0, valid=">= 0")
    workers_per_trial: int = option(1, check=lambda v: v >= 1, valid=">= 1")
    # Custom Ray resources each training worker asks for: node labels that pin training to some
    # nodes, e.g. {defectforge_worker: 1} (`cluster up`) or {defectforge_gpu_worker: 1} (aws.yaml).
    custom_per_worker: dict[str, float] = option(
        {},
        check=_custom_resources_ok,
        valid="a mapping of custom resource names (not CPU, GPU, memory) to positive amounts",
    )
    one_worker_in_process: bool = option(
        True,
        "a one-worker trial trains in its own Tune process; false: a Ray Train run of one "
        "worker, as trials of several workers are (benchmarks/study_overhead.py compares them)",
    )


@dataclass(frozen=True)
class FinalSpec(TypedConfig):
    kind = "final section"

    seeds: int = option(3, check=lambda v: v == 0 or v >= 3, valid="0, or >= 3 for an interval")
    epochs: int = option(0, check=lambda v: v >= 0, valid=">= 0 (0: as the best trial)")
    first_seed: int = option(
        1000,
        "seeds first_seed, first_seed + 1, ...: a second compare study from 1003 adds seeds "
        "to arms a first one ran with 1000-1002",
        # Final retrains use seeds no search trial used, so their interval is an honest estimate.
        check=lambda v: v >= 1000,
        valid=">= 1000 (seeds below are the search trials')",
    )
    baseline: dict = option(
        {},
        "the configuration the chosen one is compared with on test, paired by seed: values "
        "over the search space's fixed ones and the defaults, e.g. {synthetic_ratio: 0.0} for "
        "the real-only default; empty: no comparison",
        check=lambda v: isinstance(v, dict),
        valid="a mapping, e.g. {synthetic_ratio: 0.0}",
    )


@dataclass(frozen=True)
class StudySpec:
    name: str
    dataset: DatasetSpec
    search_space: dict[str, Any]
    search: SearchSpec = field(default_factory=SearchSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    training: dict[str, Any] = field(default_factory=dict)
    storage_path: str = "runs/studies"
    final: FinalSpec = field(default_factory=FinalSpec)
    description: str = ""
    expected_runtime: dict[str, str] = field(default_factory=dict)
    stages: Stages = field(default_factory=Stages)

    def searched(self) -> dict[str, Any]:
        """The keys that vary (lists and ranges; ``arms`` is one of them)."""
        return {k: v for k, v in self.search_space.items() if isinstance(v, list | Range)}

    def fixed(self) -> dict[str, Any]:
        return {k: v for k, v in self.search_space.items() if not isinstance(v, list | Range)}

    def varied(self) -> list[str]:
        """The option names that differ between trials: searched keys and the arms' keys."""
        arms = self.search_space.get(ARMS, [])
        in_arms = {key for arm in arms for key in arm}
        return sorted((set(self.searched()) - {ARMS}) | in_arms)

    def values_of(self, key: str) -> list:
        """Every value ``key`` takes in the space (a range as its two ends)."""
        in_arms = [arm[key] for arm in self.search_space.get(ARMS, []) if key in arm]
        return in_arms + self._outside_arms(key)

    def _outside_arms(self, key: str) -> list:
        value = self.search_space.get(key)
        if value is None:
            return []
        if isinstance(value, Range):
            return [value.low, value.high]
        return value if isinstance(value, list) else [value]

    def mix_points(self) -> list[dict]:
        """Every (synthetic_ratio, synthetic_source, real_count) a trial may train with: an
        arm's own values, else the space's (a range as its two ends), else the defaults; and
        the final step's baseline. ``section`` says which part of the spec set it."""
        points = []
        for arm in self.search_space.get(ARMS) or [{}]:
            options = [
                [arm[key]] if key in arm else self._outside_arms(key) or [default]
                for key, default in MIX_DEFAULTS.items()
            ]
            points += [
                {**dict(zip(MIX_DEFAULTS, combo, strict=True)), "section": "search_space"}
                for combo in product(*options)
            ]
        if self.final.baseline:
            baseline = {**MIX_DEFAULTS, **self.fixed(), **self.final.baseline}
            points.append(
                {key: baseline[key] for key in MIX_DEFAULTS} | {"section": "final.baseline"}
            )
        return points

    def synthetic_sources(self) -> set[str]:
        """The synthetic sources some trial mixes in (gan, copy_paste, gan_masks)."""
        return {p["synthetic_source"] for p in self.mix_points() if p["synthetic_ratio"] > 0}


def trial_values(config: dict) -> dict:
    """A trial's options, its arm's mapping merged in."""
    values = {k: v for k, v in config.items() if k != ARMS}
    return {**values, **config.get(ARMS, {})}


SECTIONS = {
    "dataset": DatasetSpec,
    "search": SearchSpec,
    "resources": ResourcesSpec,
    "final": FinalSpec,
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
        name=str(data["name"]),
        search_space=_search_space(where, space),
        training=training,
        storage_path=str(data.get("storage_path", "runs/studies")),
        description=str(data.get("description", "")),
        expected_runtime=_text_mapping(where, "expected_runtime", data.get("expected_runtime")),
        stages=parse_stages(where, data),
        **sections,
    )
    _check_consistency(where, spec)
    return spec


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
    elif ARMS in spec.search_space:
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
    """Every synthetic set a trial may mix in is given, or made by a stage."""
    for source in sorted(spec.synthetic_sources()):
        key = SOURCE_DATASETS[source]
        stage, fix = SOURCE_STAGES[source]
        if not (getattr(spec.dataset, key) or getattr(spec.stages, stage)):
            raise SpecError(
                where,
                f"dataset.{key}",
                getattr(spec.dataset, key),
                f"synthetic_source {source} with synthetic_ratio > 0 needs this dataset",
                f"set dataset.{key} to a {fix}",
            )


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
    if stages.mask_gan is not None and stages.generate_masks is None:
        raise SpecError(
            where,
            "mask_gan",
            settings_of(stages.mask_gan),
            "nothing uses its generator: only a generate_masks stage draws from it",
            "add generate_masks: {count: N}, or remove mask_gan",
        )
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


def load_spec(path: str | Path) -> StudySpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), "(file)", str(path), "no such spec file", "check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = one_line(getattr(err, "problem", None) or str(err))
        raise SpecError(f"{path}: not valid YAML at {at}: {problem}; fix the syntax") from None
    return parse_spec(data, str(path))

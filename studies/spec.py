"""A study spec: what to search, how, on which data and resources, and the held-out final check.

Specs are YAML, typed here and checked when loaded: an error names the key, the value and the fix
(``SpecError``), before any Ray work starts. A search-space entry is a fixed value, a list
(choices; the grid's values), or a range ``{low: .., high: .., log: true}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from defectforge.segmentation.losses import parse_loss
from defectforge.segmentation.models import check_architecture, check_encoder

ALGORITHMS = ("optuna", "grid")
# Field annotations are strings (postponed evaluation); these are the scalar ones specs use.
FIELD_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}
METRIC = "val_binary_defect_iou"
RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class SpecError(ValueError):
    def __init__(self, where: str, key: str, value: Any, problem: str, fix: str):
        super().__init__(f"{where}: {key} = {value!r}: {problem}; {fix}")


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False


def _in_unit_interval(value: float, closed_high: bool = True) -> bool:
    return 0 <= value <= 1 if closed_high else 0 <= value < 1


# Per searchable key: (Python type, check of one value, what a valid value is).
SEARCHABLE: dict[str, tuple[type, Any, str]] = {
    "synthetic_ratio": (float, lambda v: _in_unit_interval(v, False), "a number in [0, 1)"),
    "arch": (str, lambda v: check_architecture(v) or True, "an smp architecture name"),
    "encoder": (str, lambda v: check_encoder(v) or True, "an smp encoder name"),
    "aug_strength": (float, _in_unit_interval, "a number in [0, 1]"),
    "loss": (str, lambda v: parse_loss(v) is not None, "a loss spec such as ce+dice"),
    "tversky_alpha": (float, lambda v: 0 < v < 1, "a number in (0, 1)"),
    "lr": (float, lambda v: v > 0, "a positive number"),
    "batch_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "epochs": (int, lambda v: v >= 1, "an integer >= 1"),
    # Listing seeds on a grid repeats every configuration: the report's error bars.
    "seed": (int, lambda v: v >= 0, "an integer >= 0"),
}
DEFAULT_SPACE = {"synthetic_ratio": 0.0}


@dataclass(frozen=True)
class DatasetSpec:
    real: str
    synthetic: str = ""
    image_size: int = 0
    crop_size: int = 128
    binary: bool = False


@dataclass(frozen=True)
class AshaSpec:
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass(frozen=True)
class SearchSpec:
    algorithm: str = "optuna"
    num_samples: int = 1
    max_concurrent_trials: int = 1
    seed: int = 0
    asha: AshaSpec | None = None
    optuna_storage: str = ""


@dataclass(frozen=True)
class ResourcesSpec:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 1
    # Custom Ray resources each training worker asks for: node labels that pin training to some
    # nodes, e.g. {defectforge_worker: 1} (`cluster up`) or {defectforge_gpu_worker: 1} (aws.yaml).
    custom_per_worker: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingSpec:
    """Per-trial settings that are not searched."""

    max_steps_per_epoch: int = 0  # 0: whole epochs; a cap keeps CPU-sized studies short
    encoder_weights: str = ""  # "", "imagenet" or a local state-dict file
    threads: int = 0  # torch threads per worker; 0: the CPUs it was given


@dataclass(frozen=True)
class FinalSpec:
    seeds: int = 3
    epochs: int = 0  # 0: as many as the best trial trained


@dataclass(frozen=True)
class StudySpec:
    name: str
    dataset: DatasetSpec
    search_space: dict[str, Any]
    search: SearchSpec = field(default_factory=SearchSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    storage_path: str = "runs/studies"
    final: FinalSpec = field(default_factory=FinalSpec)
    description: str = ""
    expected_runtime: dict[str, str] = field(default_factory=dict)

    def searched(self) -> dict[str, Any]:
        """The keys that vary (lists and ranges)."""
        return {k: v for k, v in self.search_space.items() if isinstance(v, list | Range)}

    def fixed(self) -> dict[str, Any]:
        return {k: v for k, v in self.search_space.items() if not isinstance(v, list | Range)}


def _section(where: str, key: str, values: Any, cls: type, nested: dict | None = None):
    """Build dataclass ``cls`` from mapping ``values``, rejecting unknown keys and wrong types."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise SpecError(where, key, values, "must be a mapping", f"write {key}: followed by keys")
    known = {f.name: f for f in fields(cls)}
    for name, value in values.items():
        if name not in known:
            raise SpecError(
                where, f"{key}.{name}", value, "unknown key", f"use one of {sorted(known)}"
            )
    built = {}
    for name, value in values.items():
        if nested and name in nested:
            built[name] = (
                None if value is None else _section(where, f"{key}.{name}", value, nested[name])
            )
            continue
        expected = FIELD_TYPES.get(known[name].type)
        if expected and (
            not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected)
        ):
            raise SpecError(
                where,
                f"{key}.{name}",
                value,
                f"must be of type {known[name].type}",
                "fix its value",
            )
        built[name] = value
    return cls(**built)


def _space_entry(where: str, key: str, value: Any) -> Any:
    if key not in SEARCHABLE:
        raise SpecError(
            where, f"search_space.{key}", value, "not a searchable key", f"use {sorted(SEARCHABLE)}"
        )
    kind, valid, description = SEARCHABLE[key]
    fix = f"change it to {description}"

    def check(item: Any) -> Any:
        number = kind in (int, float)
        ok_type = isinstance(item, kind) or (kind is float and isinstance(item, int))
        if isinstance(item, bool) or not ok_type:
            raise SpecError(where, f"search_space.{key}", item, f"must be {description}", fix)
        try:
            ok = valid(item)
        except ValueError as err:
            raise SpecError(where, f"search_space.{key}", item, str(err), fix) from None
        if not ok:
            raise SpecError(where, f"search_space.{key}", item, f"must be {description}", fix)
        return float(item) if number and kind is float else item

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


def parse_spec(data: Any, where: str = "spec") -> StudySpec:
    if not isinstance(data, dict):
        raise SpecError(where, "(top)", data, "a spec is a mapping", "see studies/specs/")
    known = {f.name for f in fields(StudySpec)}
    for key in data:
        if key not in known:
            raise SpecError(where, key, data[key], "unknown key", f"use one of {sorted(known)}")
    for key in ("name", "dataset", "search_space"):
        if key not in data:
            raise SpecError(where, key, None, "missing", f"add a {key} section")
    space = data["search_space"]
    if not isinstance(space, dict):
        raise SpecError(where, "search_space", space, "must be a mapping", "key: value lines")
    spec = StudySpec(
        name=str(data["name"]),
        dataset=_section(where, "dataset", data["dataset"], DatasetSpec),
        search_space={
            **DEFAULT_SPACE,
            **{k: _space_entry(where, k, v) for k, v in space.items()},
        },
        search=_section(where, "search", data.get("search"), SearchSpec, {"asha": AshaSpec}),
        resources=_section(where, "resources", data.get("resources"), ResourcesSpec),
        training=_section(where, "training", data.get("training"), TrainingSpec),
        storage_path=str(data.get("storage_path", "runs/studies")),
        final=_section(where, "final", data.get("final"), FinalSpec),
        description=str(data.get("description", "")),
        expected_runtime=dict(data.get("expected_runtime") or {}),
    )
    _check_consistency(where, spec)
    return spec


def _check_custom_resources(where: str, custom: Any) -> None:
    key = "resources.custom_per_worker"
    if not isinstance(custom, dict):
        raise SpecError(where, key, custom, "must be a mapping", "write {label_name: 1}")
    for name, amount in custom.items():
        if name in RESERVED_RESOURCES or not isinstance(name, str):
            raise SpecError(
                where, key, name, "not a custom resource", "set CPUs and GPUs with *_per_trial"
            )
        if isinstance(amount, bool) or not isinstance(amount, int | float) or amount <= 0:
            raise SpecError(where, f"{key}.{name}", amount, "must be a positive number", "use 1")


def _check_consistency(where: str, spec: StudySpec) -> None:
    search = spec.search
    if search.algorithm not in ALGORITHMS:
        raise SpecError(
            where, "search.algorithm", search.algorithm, "unknown", f"use one of {ALGORITHMS}"
        )
    if search.algorithm == "grid":
        for key, value in spec.searched().items():
            if isinstance(value, Range):
                raise SpecError(
                    where,
                    f"search_space.{key}",
                    value,
                    "a grid search needs lists, not ranges",
                    "list the values or use algorithm: optuna",
                )
    for key in ("num_samples", "max_concurrent_trials"):
        if getattr(search, key) < 1:
            raise SpecError(
                where, f"search.{key}", getattr(search, key), "must be >= 1", "raise it"
            )
    ratios = spec.search_space["synthetic_ratio"]
    uses_synthetic = (
        ratios.high > 0 if isinstance(ratios, Range) else any(r > 0 for r in _listed(ratios))
    )
    if uses_synthetic and not spec.dataset.synthetic:
        raise SpecError(
            where,
            "dataset.synthetic",
            spec.dataset.synthetic,
            "synthetic_ratio > 0 needs a labelled synthetic dataset",
            "set dataset.synthetic to a `synth label` output",
        )
    if spec.final.seeds and spec.final.seeds < 3:
        raise SpecError(
            where, "final.seeds", spec.final.seeds, "an interval needs >= 3 seeds", "use 3 or 0"
        )
    _check_custom_resources(where, spec.resources.custom_per_worker)
    if spec.resources.workers_per_trial < 1 or spec.resources.cpus_per_trial <= 0:
        raise SpecError(
            where, "resources", spec.resources, "workers >= 1 and cpus > 0 per trial", "fix them"
        )


def _listed(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def load_spec(path: str | Path) -> StudySpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), "(file)", str(path), "no such spec file", "check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(
            str(path), "(yaml)", None, f"not valid YAML ({err})", "fix the syntax"
        ) from None
    return parse_spec(data, str(path))

"""A study spec's shape: its sections as typed configs, the searched-value ranges, and what
follows from a parsed spec (its varied keys, mix points, synthetic sources). ``studies.spec``
parses a YAML file into it and checks it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import product
from typing import Any

from defectforge.core.config import SEED, TypedConfig, option
from defectforge.segmentation.config import SegConfig
from defectforge.studies.stages import Stages

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
    combined: str = option(
        "",
        "two or more labelled synthetic sets as one (`synth combine`) for synthetic_source "
        "combined; or made by the combine stage",
    )


# The dataset each synthetic source mixes in, and what makes it when a spec gives no path.
SOURCE_DATASETS = {
    "gan": "synthetic",
    "copy_paste": "copy_paste",
    "gan_masks": "gan_masks",
    "combined": "combined",
}
SOURCE_STAGES = {
    "gan": ("label", "`synth label` output, or add generate and label stages"),
    "copy_paste": ("copy_paste", "`synth copy-paste` output, or add a copy_paste stage"),
    "gan_masks": (
        "generate_masks",
        "`gan generate` output of a --masks run, or add mask_gan and generate_masks stages",
    ),
    "combined": ("combine", "`synth combine` output, or add a combine stage"),
}


# Where Optuna may keep a study: SQLAlchemy's URLs of the databases it supports.
DATABASE_URL = r"^(sqlite|postgresql|mysql|oracle|mssql)(\+\w+)?://"


@dataclass(frozen=True)
class AshaSpec(TypedConfig):
    kind = "asha section"

    grace_period: int = option(
        1,
        help="epochs every trial trains before ASHA may stop it",
        check=lambda v: v >= 1,
        valid=">= 1",
    )
    reduction_factor: int = option(
        2,
        help="ASHA's halving rate: 1 / this of the trials go on at each rung",
        check=lambda v: v >= 2,
        valid=">= 2",
    )


@dataclass(frozen=True)
class SearchSpec(TypedConfig):
    kind = "search section"

    algorithm: str = option(
        "optuna",
        help=(
            "`optuna`: seeded TPE through Tune's OptunaSearch; `grid`: every point of the lists; "
            "`compare`: every grid point is an arm, trained with the `final.seeds` seeds and "
            "scored on test, nothing searched"
        ),
        choices=ALGORITHMS,
    )
    num_samples: int = option(
        1,
        help="trials Optuna draws (a grid is repeated this many times)",
        check=lambda v: v >= 1,
        valid=">= 1",
    )
    max_concurrent_trials: int = option(
        1,
        help="trials training at once; each waits for one of these slots before it reads data",
        check=lambda v: v >= 1,
        valid=">= 1",
    )
    seed: int = option(0, "seed of the search algorithm (Optuna's TPE sampler)", *SEED)
    asha: AshaSpec | None = option(None, "early stopping of trials by validation IoU")
    optuna_storage: str = option(
        "",
        "FILE.db: Optuna's study also kept in this SQLite file, for `optuna-dashboard`",
        check=lambda v: not v or bool(re.match(DATABASE_URL, v)) or "://" not in v,
        valid="a local .db file or a database URL (sqlite:///, postgresql://, mysql://): Optuna "
        "keeps its study in a database, not on object storage",
    )


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

    cpus_per_trial: float = option(
        1.0, help="CPUs per trial (fractions allowed)", check=lambda v: v > 0, valid="> 0"
    )
    gpus_per_trial: float = option(
        0.0, help="GPUs per trial (fractions allowed)", check=lambda v: v >= 0, valid=">= 0"
    )
    workers_per_trial: int = option(
        1, help="Ray Train workers per trial (data-parallel)", check=lambda v: v >= 1, valid=">= 1"
    )
    # Custom Ray resources each training worker asks for: node labels that pin training to some
    # nodes, e.g. {defectforge_worker: 1} (`cluster up`) or {defectforge_gpu_worker: 1} (aws.yaml).
    custom_per_worker: dict[str, float] = option(
        {},
        help=(
            "custom Ray resources each training worker asks for: node labels such as "
            "`{defectforge_worker: 1}` (`cluster up`) or `{defectforge_gpu_worker: 1}` "
            "(`cluster/aws.yaml`)"
        ),
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

    seeds: int = option(
        3,
        help=(
            "fresh seeds of the chosen configuration, each trained again and scored once on the "
            "test split (0: no final step; a compare study: seeds per arm)"
        ),
        check=lambda v: v == 0 or v >= 3,
        valid="0, or >= 3 for an interval",
    )
    epochs: int = option(
        0,
        help="their epochs (0: as the best trial)",
        check=lambda v: v >= 0,
        valid=">= 0 (0: as the best trial)",
    )
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
class TrackingSpec(TypedConfig):
    kind = "tracking section"

    mlflow: str = option(
        "",
        "an MLflow tracking server (`http://HOST:5000`): one MLflow run per trial (its values and "
        "every epoch's metrics), and one for the study (the chosen values, the held-out result, "
        "the report and the export)",
        check=lambda v: v == "" or v.startswith(("http://", "https://")),
        valid="an http(s):// URL of a tracking server the driver reaches, e.g. http://127.0.0.1:5000",
    )
    experiment: str = option("", "the MLflow experiment (default: the study's name)")


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
    tracking: TrackingSpec = field(default_factory=TrackingSpec)

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
        """The synthetic sources some trial mixes in (``SOURCE_DATASETS``' keys)."""
        return {p["synthetic_source"] for p in self.mix_points() if p["synthetic_ratio"] > 0}


def trial_values(config: dict) -> dict:
    """A trial's options, its arm's mapping merged in."""
    values = {k: v for k, v in config.items() if k != ARMS}
    return {**values, **config.get(ARMS, {})}

"""Everything about a study that is settled before its first trial: the trial config's base,
the checks that refuse what would fail or hang later, and the trials' CPU share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from defectforge.core.errors import ConfigError, DataError
from defectforge.core.storage import Location, absolute_location
from defectforge.datasets.build import discover
from defectforge.datasets.contract import MANIFEST
from defectforge.datasets.leakage import check_no_copies
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.mix import NotEnoughSynthetic, check_compatible, plan_for
from defectforge.segmentation.config import SegConfig
from defectforge.segmentation.models import names_weights_file, read_encoder_state
from defectforge.studies.errors import SpecError
from defectforge.studies.spec_schema import (
    ARMS,
    MIX_DEFAULTS,
    SOURCE_DATASETS,
    StudySpec,
    trial_values,
)
from defectforge.trainables.runtime import warn_of_missing, worker_cpus
from defectforge.trainables.seg import config_from_manifest
from defectforge.trainables.seg_feed import check_batch_fits, check_crop_fits


@dataclass(frozen=True)
class StudyContext:
    """What every trial needs besides its sampled values."""

    spec: StudySpec
    root: str
    base: SegConfig
    slots: Any = None  # a TrialSlots actor: max_concurrent_trials, restored studies included
    worker_cpus: float = 1.0  # per training worker, as study_worker_cpus settled it
    in_process: bool = False  # one worker per trial, trained in the trial's own process

    def trial_config(self, values: dict) -> SegConfig:
        values = trial_values(values)
        mix = {**MIX_DEFAULTS, **values}
        ratio, source = mix["synthetic_ratio"], mix["synthetic_source"]
        synthetic = synthetic_set(self.spec, source) if ratio else ""
        return replace(self.base, **values, synthetic=synthetic)

    def worker_resources(self) -> dict:
        res = self.spec.resources
        per_worker = {"CPU": self.worker_cpus, **res.custom_per_worker}
        if res.gpus_per_trial:
            per_worker["GPU"] = res.gpus_per_trial / res.workers_per_trial
        return per_worker


def synthetic_set(spec: StudySpec, source: str) -> str:
    """The dataset a synthetic source names (``SOURCE_DATASETS``)."""
    return getattr(spec.dataset, SOURCE_DATASETS[source])


def _synthetic_sources(spec: StudySpec) -> dict[str, str]:
    """The synthetic sets the study's trials may mix in, by source."""
    return {source: synthetic_set(spec, source) for source in sorted(spec.synthetic_sources())}


def base_config(spec: StudySpec) -> SegConfig:
    """The trial config before the search space's values: data, training options, resources."""
    res = spec.resources
    cpus_per_worker = res.cpus_per_trial / res.workers_per_trial
    options = {"threads": max(1, int(cpus_per_worker)), **spec.training}
    return config_from_manifest(
        spec.dataset.real, workers=res.workers_per_trial, use_gpu=res.gpus_per_trial > 0, **options
    )


def check_study(spec: StudySpec, where: str) -> dict:
    """Refuse what would fail or hang later: data, test split, configs, resources."""
    manifest = Manifest.load(spec.dataset.real)
    ids = {"real": manifest.dataset_id}
    for source, path in _synthetic_sources(spec).items():
        ids[SOURCE_DATASETS[source]] = check_compatible(spec.dataset.real, path)[1].dataset_id
        check_no_copies(spec.dataset.real, path)
    if spec.final.seeds and not manifest.split_total("test"):
        raise SpecError(
            where,
            "final.seeds",
            spec.final.seeds,
            f"the dataset {spec.dataset.real} has no test split to hold out",
            "rebuild it with `data build --test-fraction 0.1` (NEU-Seg) or set final.seeds: 0",
        )
    base = base_config(spec)
    real_rows = manifest.split_total("train")
    rows = {_mix_key(p): _planned_rows(spec, base, p, real_rows, where) for p in spec.mix_points()}
    _check_values(spec, base, where)
    _check_data_fits(spec, base, lambda point: rows.get(_mix_key(point)), where)
    study_worker_cpus(spec)
    return ids


def check_encoder_weights(spec: StudySpec, where: str) -> None:
    """Encoder weights the trials cannot read would fail every trial once every stage has run:
    refused before any stage (read from where the driver runs; a URI is read the same from
    every node)."""
    weights = spec.training.get("encoder_weights")
    if not names_weights_file(weights):
        return
    location = Location.of(weights)
    if not location.is_file():
        raise SpecError(
            where,
            "training.encoder_weights",
            weights,
            "no such file",
            "give a state-dict file at a path every node has, or an s3:// URI, 'imagenet', "
            "or leave it out",
        )
    try:
        read_encoder_state(location)
    except DataError as err:
        raise SpecError(where, "training.encoder_weights", weights, err.problem, err.fix) from None


def check_raw_images(spec: StudySpec, where: str) -> None:
    """The data stage's raw images, found as `data build` finds them (layout, masks, classes,
    channels), before any stage runs: a wrong root or layout is one line now, not when the
    stage starts. Each image is decoded by the stage itself."""
    cfg = spec.stages.data
    if cfg is None:
        return
    try:
        discover(replace(cfg, root=absolute_location(cfg.root)))
    except DataError as err:
        raise SpecError(
            where, "data.root", cfg.root, f"{err.path}: {err.problem}", err.fix
        ) from None


def check_trial_values(spec: StudySpec, real: str, where: str) -> None:
    """The values check of ``check_study``, as soon as the real dataset exists: a pipeline runs
    it after its data stages, before any stage trains."""
    spec = replace(spec, dataset=replace(spec.dataset, real=real))
    base = base_config(spec)
    _check_values(spec, base, where)
    # The synthetic sets are not made yet: only the real-only trials' data is known.
    real_rows = Manifest.load(real).split_total("train")
    _check_data_fits(
        spec, base, lambda point: None if point["synthetic_ratio"] else real_rows, where
    )


def _mix_key(point: dict) -> tuple:
    return tuple(point[key] for key in MIX_DEFAULTS)


def _mixed_config(spec: StudySpec, base: SegConfig, point: dict) -> SegConfig:
    """The trial config of a mix point (the real data alone at ratio 0)."""
    if not point["synthetic_ratio"]:
        return base
    return replace(
        base,
        synthetic=synthetic_set(spec, point["synthetic_source"]),
        synthetic_ratio=point["synthetic_ratio"],
        real_count=point["real_count"],
    )


def _planned_rows(spec: StudySpec, base: SegConfig, point: dict, real_rows: int, where: str) -> int:
    """The train rows of a mix point's trials (before defect oversampling). A trial asking for
    more synthetic (or real) images than exist would only fail once it ran: every mix a trial
    may ask for is planned now."""
    if not point["synthetic_ratio"]:
        return real_rows
    mix = _mixed_config(spec, base, point)
    try:
        plan = plan_for(spec.dataset.real, mix.synthetic, mix.mix).plan
    except NotEnoughSynthetic as err:
        raise SpecError(
            where,
            f"{point['section']}.synthetic_ratio",
            point["synthetic_ratio"],
            err.problem,
            spec.stages.more_images_fix(point["synthetic_source"]),
        ) from None
    except DataError as err:
        raise SpecError(
            where, f"{point['section']}.real_count", point["real_count"], err.problem, err.fix
        ) from None
    return plan.real_rows + len(plan.synthetic_ids)


def _check_data_fits(
    spec: StudySpec, base: SegConfig, rows_of: Callable[[dict], int | None], where: str
) -> None:
    """Crops larger than every train image, and batches larger than a trial's train rows, fail
    in every trial that draws them, and `study resume` would run them again: refused now, arm
    by arm (an arm's values with its own mixes), and for the final step's baseline. ``rows_of``:
    a mix point's train rows (None: not known yet). With defect oversampling (more rows, how
    many depends on the rows) the batch is left to the trials' own check."""
    for arm in spec.search_space.get(ARMS) or [{}]:
        one = _one_arm(spec, arm)
        # The arm's own fixed values (an image_size sets the crop limit), its mix aside.
        arm_base = replace(base, **{k: v for k, v in arm.items() if k not in MIX_DEFAULTS})
        points = [p for p in one.mix_points() if p["section"] == "search_space"]
        values = {key: one.values_of(key) for key in ("crop_size", "batch_size")}
        oversampled = min(one.values_of("defect_oversample") or [base.defect_oversample]) > 1
        for point in points:
            rows = None if oversampled else rows_of(point)
            _check_fits(one, arm_base, point, values, rows, where)
    if spec.final.baseline:
        baseline = baseline_arm(spec, base)
        point = {key: baseline.get(key, default) for key, default in MIX_DEFAULTS.items()}
        cfg = replace(base, **{k: v for k, v in baseline.items() if k not in MIX_DEFAULTS})
        rows = None if cfg.defect_oversample > 1 else rows_of(point)
        _check_fits(spec, cfg, point, {}, rows, where, "final.baseline")


def _one_arm(spec: StudySpec, arm: dict) -> StudySpec:
    """The spec as if ``arm`` were its only arm."""
    outside = {key: value for key, value in spec.search_space.items() if key != ARMS}
    return replace(spec, search_space={**outside, **({ARMS: [arm]} if arm else {})})


def _check_fits(
    spec: StudySpec,
    base: SegConfig,
    point: dict,
    values: dict[str, list],
    rows: int | None,
    where: str,
    section: str = "",
) -> None:
    """One mix point's crops (against its real and synthetic images) and batches (against its
    ``rows``, when known); ``values``: the crop and batch sizes its trials may draw."""
    if point["synthetic_ratio"]:
        synthetic = synthetic_set(spec, point["synthetic_source"])
        if not synthetic or not (Location.of(synthetic) / MANIFEST).is_file():
            return  # made by a stage that has not run yet
    cfg = _mixed_config(spec, base, point)
    checks = {"crop_size": check_crop_fits}
    if rows is not None:
        checks["batch_size"] = lambda config: check_batch_fits(config, rows)
    for key, check in checks.items():
        where_set = section or ("search_space" if values.get(key) else "training")
        for value in values.get(key) or [getattr(cfg, key)]:
            try:
                check(replace(cfg, **{key: value}))
            except ConfigError as err:
                raise _spec_error(err, where, f"{where_set}.{key}", value) from None


def _check_values(spec: StudySpec, base: SegConfig, where: str) -> None:
    """Every value of the space, in every arm, makes a valid trial config."""
    # Any path will do for the checks between options (ratio > 0 needs a synthetic set).
    given = [getattr(spec.dataset, key) for key in SOURCE_DATASETS.values()]
    marker = {"synthetic": next(filter(None, given), "synthetic")}
    for arm in spec.search_space.get(ARMS) or [{}]:
        arm_base = _checked(base, {**arm, **marker}, where, "search_space.arms", arm)
        for key in set(spec.search_space) - {ARMS} - set(MIX_DEFAULTS):
            for candidate in spec.values_of(key):
                _checked(arm_base, {key: candidate}, where, f"search_space.{key}", candidate)
    # The mix keys hold together (real_count needs a ratio above 0): each of a mix point's
    # values is checked with the ones before it, so an error names the key that breaks it.
    for point in spec.mix_points():
        values = dict(marker)
        for key in MIX_DEFAULTS:
            values[key] = point[key]
            _checked(base, values, where, f"{point['section']}.{key}", point[key])
    if spec.final.baseline:
        baseline = baseline_arm(spec, base)
        _checked(base, {**marker, **baseline}, where, "final.baseline", spec.final.baseline)


def baseline_arm(spec: StudySpec, base: SegConfig) -> dict:
    """The final step's baseline, as it is checked and as it trains: every varied key back at
    its default, then the spec's fixed values, then ``final.baseline``; no seed (each run takes
    the final step's) and the final step's epochs."""
    values = {key: getattr(base, key) for key in spec.varied() if key != "seed"}
    values.update(spec.fixed())
    values.update(spec.final.baseline)
    values.pop("seed", None)
    if spec.final.epochs:
        values["epochs"] = spec.final.epochs
    return values


def _checked(base: SegConfig, values: dict, where: str, key: str, shown) -> SegConfig:
    try:
        return replace(base, **values)
    except ConfigError as err:
        raise _spec_error(err, where, key, shown) from None


def _spec_error(err: ConfigError, where: str, key: str, shown) -> SpecError:
    problem, _, fix = str(err).partition("; ")
    # The option's own "key = value: " would repeat what the spec error says first.
    own = f"{key.rsplit('.', 1)[-1]} = "
    if problem.startswith(own):
        problem = problem.partition(": ")[2]
    return SpecError(where, key, shown, problem, fix or "change the value")


def study_worker_cpus(spec: StudySpec) -> float:
    """CPUs per training worker: the spec's share, lowered if the concurrent trials' workers
    would leave Ray Data no CPU (a stalled study), GPU trials as CPU ones; refused where even a
    small share cannot."""
    res = spec.resources
    workers = spec.search.max_concurrent_trials * res.workers_per_trial
    wanted = res.cpus_per_trial / res.workers_per_trial
    share = worker_cpus(workers, wanted, "concurrent trial workers")
    if share < wanted:
        print(
            f"resources: {share:g} CPU per training worker instead of {wanted:g}, so Ray Data "
            "keeps a CPU to read with",
            flush=True,
        )
    return share


def warn_of_missing_resources(spec: StudySpec) -> None:
    """GPUs or node labels a trial asks for and no node has (``runtime``'s warning)."""
    res = spec.resources
    asked = {
        "GPU": res.gpus_per_trial,
        **{name: amount * res.workers_per_trial for name, amount in res.custom_per_worker.items()},
    }
    warn_of_missing(
        asked, "resources: a trial", "lower resources.gpus_per_trial or custom_per_worker"
    )

"""Everything about a study that is settled before its first trial: the trial config's base,
the checks that refuse what would fail or hang later, and the trials' CPU share."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from defectforge.datasets.errors import ConfigError
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.mix import NotEnoughSynthetic, check_compatible, plan_for
from defectforge.segmentation.config import SegConfig
from defectforge.studies.spec import Range, SpecError, StudySpec
from defectforge.trainables.runtime import worker_cpus
from defectforge.trainables.seg import config_from_manifest


@dataclass(frozen=True)
class StudyContext:
    """What every trial needs besides its sampled values."""

    spec: StudySpec
    root: str
    base: SegConfig
    slots: Any = None  # a TrialSlots actor: max_concurrent_trials, restored studies included
    worker_cpus: float = 1.0  # per training worker, as study_worker_cpus settled it

    def trial_config(self, values: dict) -> SegConfig:
        values = dict(values)
        ratio = values.get("synthetic_ratio", 0.0)
        return replace(self.base, **values, synthetic=self.spec.dataset.synthetic if ratio else "")

    def worker_resources(self) -> dict:
        res = self.spec.resources
        per_worker = {"CPU": self.worker_cpus, **res.custom_per_worker}
        if res.gpus_per_trial:
            per_worker["GPU"] = res.gpus_per_trial / res.workers_per_trial
        return per_worker


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
    if spec.dataset.synthetic:
        ids["synthetic"] = check_compatible(spec.dataset.real, spec.dataset.synthetic)[1].dataset_id
    if spec.final.seeds and not manifest.split_total("test"):
        raise SpecError(
            where,
            "final.seeds",
            spec.final.seeds,
            f"the dataset {spec.dataset.real} has no test split to hold out",
            "rebuild it with `data build --test-fraction 0.1` (NEU-Seg) or set final.seeds: 0",
        )
    base = base_config(spec)
    _check_enough_synthetic(spec, base, where)
    for key, value in spec.search_space.items():
        candidates = [value.low, value.high] if isinstance(value, Range) else _as_list(value)
        for candidate in candidates:
            try:
                replace(base, **{key: candidate, "synthetic": spec.dataset.synthetic})
            except ConfigError as err:
                raise SpecError(
                    where, f"search_space.{key}", candidate, str(err), "change the value"
                ) from None
    study_worker_cpus(spec)
    return ids


def _check_enough_synthetic(spec: StudySpec, base: SegConfig, where: str) -> None:
    """A trial asking for more synthetic images than exist would only fail once it ran."""
    ratios = spec.search_space.get("synthetic_ratio", 0.0)
    largest = ratios.high if isinstance(ratios, Range) else max(_as_list(ratios))
    if not largest:
        return
    mix = replace(base, synthetic=spec.dataset.synthetic, synthetic_ratio=largest).mix
    try:
        plan_for(spec.dataset.real, spec.dataset.synthetic, mix)
    except NotEnoughSynthetic as err:
        raise SpecError(
            where,
            "search_space.synthetic_ratio",
            largest,
            err.problem,
            "lower the largest ratio or generate and label more images",
        ) from None


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def study_worker_cpus(spec: StudySpec) -> float:
    """CPUs per training worker: the spec's share, lowered if the concurrent trials' workers
    would leave Ray Data no CPU (a stalled study); refused where even a small share cannot."""
    res = spec.resources
    if res.gpus_per_trial:
        return res.cpus_per_trial / res.workers_per_trial
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

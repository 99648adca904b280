"""A study's Tune runs: the search space as Tune domains, Optuna and ASHA, trial names, the
search, final and compare Tuners, resuming a run, and reading its results back."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from defectforge.core.storage import absolute_location, is_uri
from defectforge.segmentation.loop import EPOCHS_TRAINED
from defectforge.segmentation.selection import RANKING_METRIC
from defectforge.studies.results import (
    CHECKPOINT_SCORE,
    DEFAULT_EPOCHS,
    TrialRecord,
)
from defectforge.studies.spec_schema import ARMS, Range, StudySpec, trial_values
from defectforge.studies.store import StudyStore
from defectforge.trainables import VERBOSE_ENV
from defectforge.trainables.runtime import fit
from defectforge.trainables.study_progress import TrialLines
from defectforge.trainables.study_setup import (
    StudyContext,
    baseline_arm,
)
from defectforge.trainables.study_trials import (
    compare_trial,
    final_label,
    final_trial,
    search_trial,
)
from defectforge.trainables.tracking import tune_callbacks

SEARCH_RUN, FINAL_RUN, COMPARE_RUN = "search", "final", "compare"
# A trial of several workers only drives its Ray Train run, whose workers hold the trial's CPUs
# and GPUs. Even 0.01 CPU here would leave a 2-CPU machine 0.99 CPU beside one worker: too little
# for a Ray Data read task (1 CPU), and the study would stall. Memory alone reserves nothing the
# others need.
DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}


def _tune_domain(value, grid: bool):
    if isinstance(value, Range):
        if isinstance(value.low, int) and isinstance(value.high, int):
            sample = tune.lograndint if value.log else tune.randint
            return sample(value.low, value.high + 1)
        return (tune.loguniform if value.log else tune.uniform)(value.low, value.high)
    if isinstance(value, list):
        return tune.grid_search(value) if grid else tune.choice(value)
    return value


def param_space(spec: StudySpec) -> dict:
    grid = spec.search.algorithm in ("grid", "compare")
    return {key: _tune_domain(value, grid) for key, value in spec.search_space.items()}


ABBREVIATIONS = {
    "synthetic_ratio": "ratio",
    "synthetic_source": "source",
    "aug_strength": "aug",
    "tversky_alpha": "alpha",
}


def trial_label(trial, searched: tuple[str, ...]) -> str:
    """``<id>_arch=pan,ratio=0.38``: readable in the Ray dashboard and as a folder name."""

    def short(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    values = trial_values(trial.config)
    # An arm leaves out the keys it does not set: they are at their defaults.
    parts = [f"{ABBREVIATIONS.get(k, k)}={short(values[k])}" for k in searched if k in values]
    label = "_".join([trial.trial_id, ",".join(parts)] if parts else [trial.trial_id])
    return re.sub(r"[^\w=.,+-]", "_", label)[:120]


def _searcher(spec: StudySpec, name: str):
    # Optuna has nothing to choose when every value is fixed: the trials are plain repeats.
    if spec.search.algorithm == "grid" or not spec.searched():
        return None
    import optuna

    sampler = optuna.samplers.TPESampler(
        seed=spec.search.seed, n_startup_trials=max(4, spec.search.num_samples // 4)
    )
    storage = spec.search.optuna_storage
    return OptunaSearch(
        sampler=sampler,
        study_name=name,
        storage=optuna.storages.RDBStorage(optuna_url(storage)) if storage else None,
    )


def fail_orphaned_asks(spec: StudySpec, store: StudyStore, name: str) -> int:
    """Before a search resumes: mark failed the Optuna trials a stopped driver asked for but its
    Tune run never recorded (killed between Optuna's ask and Tune's next snapshot), so the
    storage holds no trial that is running for ever; the resumed search asks again. Returns
    how many were marked."""
    storage, location = spec.search.optuna_storage, store.location(SEARCH_RUN)
    if not storage or not tune.Tuner.can_restore(location):
        return 0
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=optuna_url(storage))
    except KeyError:  # stopped before Optuna's study was made: nothing was asked
        return 0
    # Each unfinished trial Tune recorded accounts for one running ask with its values (TPE may
    # ask the same values twice); the running asks left over were never recorded.
    unfinished = [
        trial.config
        for trial in tune.ExperimentAnalysis(location).trials
        if trial.status != "TERMINATED"
    ]
    orphans = []
    for asked in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        match = next(
            (c for c in unfinished if all(c.get(k) == v for k, v in asked.params.items())), None
        )
        if match is None:
            orphans.append(asked)
        else:
            unfinished.remove(match)
    for asked in orphans:
        study.tell(asked.number, state=optuna.trial.TrialState.FAIL)
    return len(orphans)


def optuna_url(storage: str) -> str:
    """An SQLAlchemy URL as given, or a plain file path as an sqlite database (folder made)."""
    if is_uri(storage):
        return storage
    path = Path(absolute_location(storage))
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _scheduler(spec: StudySpec):
    asha = spec.search.asha
    if asha is None:
        return None
    epochs = spec.search_space.get("epochs", spec.training.get("epochs", DEFAULT_EPOCHS))
    max_epochs = (
        max(epochs)
        if isinstance(epochs, list)
        else epochs.high
        if isinstance(epochs, Range)
        else epochs
    )
    return ASHAScheduler(
        time_attr=EPOCHS_TRAINED,
        max_t=int(max_epochs),
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
    )


def trainable(function, context: StudyContext):
    # A one-worker trial trains in its own process and holds the worker's share itself.
    resources = context.worker_resources() if context.in_process else DRIVER_RESOURCES
    return tune.with_resources(tune.with_parameters(function, context=context), resources)


@dataclass(frozen=True)
class TuneRun:
    """One Tune run of the study, as a new Tuner takes it."""

    trainable: object
    param_space: dict
    tune_config: tune.TuneConfig
    run_config: tune.RunConfig


def search_run(context: StudyContext, store: StudyStore, name: str) -> TuneRun:
    spec = context.spec
    label = partial(trial_label, searched=tuple(spec.varied()))
    return TuneRun(
        trainable(search_trial, context),
        param_space=param_space(spec),
        tune_config=_tune_config(
            context,
            label,
            metric=RANKING_METRIC,
            mode="max",
            search_alg=_searcher(spec, name),
            scheduler=_scheduler(spec),
            num_samples=spec.search.num_samples,
        ),
        run_config=_run_config(store, SEARCH_RUN, context),
    )


def _tune_config(context: StudyContext, name, dirname=None, **search) -> tune.TuneConfig:
    """What every Tune run of the study shares: its trial concurrency, trial names, and
    one-worker trials reusing their process for the next trial."""
    return tune.TuneConfig(
        max_concurrent_trials=context.spec.search.max_concurrent_trials,
        reuse_actors=context.in_process,
        trial_name_creator=name,
        trial_dirname_creator=dirname or name,
        **search,
    )


def _run_config(store: StudyStore, name: str, context: StudyContext) -> tune.RunConfig:
    """A Tune run of the study: under its folder, a failed trial retried once, its trials'
    epochs printed one line each; of the epoch models a one-worker trial reports, Tune keeps
    the best and the latest, as the trial's own epoch folders do."""
    return tune.RunConfig(
        name=name,
        storage_path=store.uri,
        failure_config=tune.FailureConfig(max_failures=1),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=CHECKPOINT_SCORE, checkpoint_score_order="max"
        ),
        callbacks=[TrialLines(context.base.epochs), *tune_callbacks(context.spec, name)],
        # Tune's status table and every reported result only with --verbose.
        verbose=3 if os.environ.get(VERBOSE_ENV) else 0,
    )


def final_run_name(best: dict) -> str:
    """``final-<trial id>``: one final run per chosen trial."""
    return f"{FINAL_RUN}-{'_'.join(best['trial'].split('_')[:2])}"


def _final_seeds(spec: StudySpec) -> list[int]:
    return [spec.final.first_seed + i for i in range(spec.final.seeds)]


def compare_run(context: StudyContext, store: StudyStore) -> TuneRun:
    """Every arm (grid point) with the final step's seeds, each scored on test."""
    spec = context.spec
    values = param_space(spec)
    if spec.final.epochs:
        values["epochs"] = spec.final.epochs
    label = partial(trial_label, searched=(*spec.varied(), "seed"))
    return TuneRun(
        trainable(compare_trial, context),
        param_space={**values, "seed": tune.grid_search(_final_seeds(spec))},
        tune_config=_tune_config(context, label),
        run_config=_run_config(store, COMPARE_RUN, context),
    )


def final_run(context: StudyContext, store: StudyStore, best: dict) -> TuneRun:
    spec = context.spec
    values = dict(best["config"])
    if spec.final.epochs:
        values["epochs"] = spec.final.epochs
    space = {**values, "seed": tune.grid_search(_final_seeds(spec))}
    baseline = final_baseline(context, best)
    if baseline:
        # The baseline as an arm over the chosen values, in the same grid as the seeds.
        space[ARMS] = tune.grid_search([{}, baseline])
    return TuneRun(
        trainable(final_trial, context),
        param_space=space,
        tune_config=_tune_config(
            context,
            lambda trial: f"{trial.trial_id}_final_{final_label(trial.config)}",
            lambda trial: f"{trial.trial_id}_{final_label(trial.config)}",
        ),
        run_config=_run_config(store, final_run_name(best), context),
    )


def final_baseline(context: StudyContext, best: dict) -> dict:
    """The baseline's values, or none where the search chose the baseline itself (it would
    train the same runs twice and compare them with themselves)."""
    if not context.spec.final.baseline:
        return {}
    spec = context.spec
    baseline = baseline_arm(spec, context.base)
    # The chosen configuration as its final runs train: keys a trial left at their defaults,
    # and the final step's epochs, as the baseline has them.
    chosen = {k: getattr(context.base, k) for k in baseline} | trial_values(best["config"])
    if spec.final.epochs:
        chosen["epochs"] = spec.final.epochs
    return {} if all(chosen[k] == v for k, v in baseline.items()) else baseline


# What Ray Tune copies from the driver's environment into every trial actor's runtime env,
# which Ray's runtime-env agent then writes into its log on every node: the secret key in
# plain text. The trials reach the store with their node's own credentials, as every other
# worker does (the storage probe refuses a node without them, naming it).
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SECURITY_TOKEN",
    "AWS_SESSION_TOKEN",
)


def keep_credentials_out_of_trial_runtime_envs() -> None:
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(CREDENTIAL_VARIABLES)


def run_tune(store: StudyStore, run: TuneRun) -> tune.ResultGrid:
    """Continue ``run`` if an earlier driver left it (finished trials are not rerun), else start.
    The restore gets the search space again: where the stopped driver left no readable Tune
    state (stopped before Tune first saved it, or while it wrote it), Tune starts the run over,
    and from the space, not from an empty one."""
    keep_credentials_out_of_trial_runtime_envs()
    location = store.location(run.run_config.name)
    if tune.Tuner.can_restore(location):
        print(f"resuming {location}", flush=True)
        tuner = tune.Tuner.restore(
            location, trainable=run.trainable, param_space=run.param_space, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            run.trainable,
            param_space=run.param_space,
            tune_config=run.tune_config,
            run_config=run.run_config,
        )
    return fit(tuner)


def _result_lines(result) -> list[dict]:
    path = f"{result.path}/result.json"
    try:
        with result.filesystem.open_input_stream(path) as stream:
            text = stream.read().decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def trial_records(results: tune.ResultGrid) -> list[TrialRecord]:
    """Tune's results as the study keeps them."""
    return [
        TrialRecord(
            name=Path(result.path).name,
            config=trial_values(dict(result.config)),
            error=str(result.error) if result.error else None,
            lines=_result_lines(result),
            arm=dict(result.config.get(ARMS) or {}),
        )
        for result in results
    ]

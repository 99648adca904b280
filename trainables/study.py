"""Studies on Ray Tune: every trial is a segmentation run; Optuna or a grid picks them.

A trial of one worker trains in its own Tune process (``trainables.trial``); a trial of several
workers is a Ray Train run of them.

A study folder (``storage_path/name``, local or a pyarrow URI) holds::

    spec.yaml, study.json     the spec as given, and what it resolved to (data ids, versions)
    search/                   the Tune experiment (Tuner.restore resumes it)
    final/                    the Tune run of the held-out step: the best configuration, >= 3 seeds
    compare/                  a compare study's one Tune run instead: every arm x the final seeds
    train/<trial>/            each trial's epoch checkpoints (the best and the latest kept)
    trials.json, final.json   one row per trial; test metrics per seed with the 95% interval
    compare.json              a compare study's arms on test and their paired differences
    report/                   report.md and its PNGs (written by ``defectforge.studies.report``)

Results, the report and the export are read from these files without Ray (``studies.results``,
``studies.export``). The search reads only train and val: every search trial runs inside ``sealed_splits("test")``,
which makes ``read_split`` refuse the test split. Only the final step (and a compare study's
trials, after training) reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import ray
import ray.data
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from defectforge.core.errors import DataError, UserError
from defectforge.core.outputs import check_name
from defectforge.core.storage import absolute_location, is_uri
from defectforge.segmentation.inference import evaluate_dataset_split
from defectforge.segmentation.selection import SELECTION_METRIC
from defectforge.studies.compare import COMPARE_FILE, summarize_comparison
from defectforge.studies.export import export_study
from defectforge.studies.results import (
    DEFAULT_EPOCHS,
    FINAL_FILE,
    SPEC_FILE,
    STUDY_FILE,
    TRIALS_FILE,
    TrialRecord,
    stored_spec,
    summarize_final,
    trial_rows,
    write_study_report,
)
from defectforge.studies.spec import (
    ARMS,
    DatasetSpec,
    Range,
    StudySpec,
    load_spec,
    trial_values,
)
from defectforge.studies.store import StudyStore
from defectforge.trainables import VERBOSE_ENV
from defectforge.trainables.data_jobs import sealed_splits
from defectforge.trainables.pipeline import Pipeline
from defectforge.trainables.runtime import check_storage_everywhere, ensure_ray, fit
from defectforge.trainables.seg import (
    best_checkpoint,
    make_trainer,
)
from defectforge.trainables.slots import TrialSlots, trial_slot
from defectforge.trainables.study_setup import (
    StudyContext,
    base_config,
    baseline_arm,
    check_study,
    study_worker_cpus,
)
from defectforge.trainables.trial import TrainedTrial, train_in_trial

SEARCH_RUN, FINAL_RUN, COMPARE_RUN, TRAIN_RUNS = "search", "final", "compare", "train"
DATASET_PATHS = tuple(spec.name for spec in DatasetSpec.options())
IN_PROCESS_KEY = "one_worker_in_process"
# Recorded when a study's stages or checks refuse it before its search: then, and only then, a
# `study run` of another spec may take its place.
REFUSED_KEY = "refused_before_search"
# A trial of several workers only drives its Ray Train run, whose workers hold the trial's CPUs
# and GPUs. Even 0.01 CPU here would leave a 2-CPU machine 0.99 CPU beside one worker: too little
# for a Ray Data read task (1 CPU), and the study would stall. Memory alone reserves nothing the
# others need.
DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}


# --- trials (run inside Tune's trial actors) ---------------------------------------------------


def _fit(context: StudyContext, values: dict, run_name: str) -> TrainedTrial:
    """Train one trial: in this process with one worker, else as a Ray Train run."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    with trial_slot(context.slots, tune.get_context().get_trial_id()):
        cfg = context.trial_config(values)
        if context.in_process:
            return train_in_trial(cfg, StudyStore(context.root), f"{TRAIN_RUNS}/{run_name}")
        trainer = make_trainer(
            cfg,
            context.root + f"/{TRAIN_RUNS}",
            run_name,
            resources_per_worker=context.worker_resources(),
            callbacks=(TuneReportCallback(),),
        )
        checkpoint, metrics = best_checkpoint(trainer.fit())
        return TrainedTrial(checkpoint.path, metrics)


def search_trial(config: dict, context: StudyContext) -> None:
    with sealed_splits("test"):
        _fit(context, config, tune.get_context().get_trial_id())


def final_trial(config: dict, context: StudyContext) -> None:
    # The run name carries the final run's (and so the chosen trial's) name: a resumed study
    # whose best trial changed never restores another configuration's checkpoints.
    experiment = tune.get_context().get_experiment_name()
    baseline = "-baseline" if _is_baseline(config) else ""
    _held_out_trial(config, context, f"{experiment}-seed{config['seed']}{baseline}")


def _is_baseline(config: dict) -> bool:
    """A final run of the baseline (its arm holds values; the chosen configuration's is empty)."""
    return bool(config.get(ARMS))


def _final_label(config: dict) -> str:
    """``seed=1000``, or ``seed=1000_baseline`` for the baseline's run of that seed."""
    return f"seed={config['seed']}" + ("_baseline" if _is_baseline(config) else "")


def compare_trial(config: dict, context: StudyContext) -> None:
    _held_out_trial(config, context, tune.get_context().get_trial_id())


def _held_out_trial(config: dict, context: StudyContext, run_name: str) -> None:
    """Train with the test split sealed, then score the best epoch's model on test."""
    with sealed_splits("test"):
        trained = _fit(context, config, run_name)
    with tempfile.TemporaryDirectory(prefix="defectforge-checkpoint-") as scratch:
        folder = StudyStore(context.root).local_copy(trained.checkpoint_location, scratch)
        test = evaluate_dataset_split(folder, "test", per_image=True)
    tune.report(
        {
            "seed": config["seed"],
            "best_epoch": trained.metrics["epoch"],
            "best_val_binary_defect_iou": trained.metrics[SELECTION_METRIC],
            "test_binary_defect_iou": test["binary_defect_iou"],
            "test_mean_defect_iou": test["mean_defect_iou"],
            "test": test,
            "best_checkpoint_path": trained.checkpoint_location,
        }
    )


# --- search space, names, Tune set-up ----------------------------------------------------------


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
        time_attr="training_iteration",
        max_t=int(max_epochs),
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
    )


def _trainable(function, context: StudyContext):
    # A one-worker trial trains in its own process and holds the worker's share itself.
    resources = context.worker_resources() if context.in_process else DRIVER_RESOURCES
    return tune.with_resources(tune.with_parameters(function, context=context), resources)


def _tuner(context: StudyContext, store: StudyStore, name: str) -> tune.Tuner:
    spec = context.spec
    label = partial(trial_label, searched=tuple(spec.varied()))
    return tune.Tuner(
        _trainable(search_trial, context),
        param_space=param_space(spec),
        tune_config=_tune_config(
            context,
            label,
            metric=SELECTION_METRIC,
            mode="max",
            search_alg=_searcher(spec, name),
            scheduler=_scheduler(spec),
            num_samples=spec.search.num_samples,
        ),
        run_config=_run_config(store, SEARCH_RUN),
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


def _run_config(store: StudyStore, name: str) -> tune.RunConfig:
    """A Tune run of the study: under its folder, a failed trial retried once."""
    return tune.RunConfig(
        name=name,
        storage_path=store.uri,
        failure_config=tune.FailureConfig(max_failures=1),
        verbose=tune_verbosity(),
    )


def tune_verbosity() -> int:
    """Tune's status table of trials (1); every reported result as well only with --verbose."""
    return 3 if os.environ.get(VERBOSE_ENV) else 1


def final_run_name(best: dict) -> str:
    """``final-<trial id>``: one final run per chosen trial."""
    return f"{FINAL_RUN}-{'_'.join(best['trial'].split('_')[:2])}"


def _final_seeds(spec: StudySpec) -> list[int]:
    return [spec.final.first_seed + i for i in range(spec.final.seeds)]


def _compare_tuner(context: StudyContext, store: StudyStore) -> tune.Tuner:
    """Every arm (grid point) with the final step's seeds, each scored on test."""
    spec = context.spec
    values = param_space(spec)
    if spec.final.epochs:
        values["epochs"] = spec.final.epochs
    label = partial(trial_label, searched=(*spec.varied(), "seed"))
    return tune.Tuner(
        _trainable(compare_trial, context),
        param_space={**values, "seed": tune.grid_search(_final_seeds(spec))},
        tune_config=_tune_config(context, label),
        run_config=_run_config(store, COMPARE_RUN),
    )


def _final_tuner(context: StudyContext, store: StudyStore, best: dict) -> tune.Tuner:
    spec = context.spec
    values = dict(best["config"])
    if spec.final.epochs:
        values["epochs"] = spec.final.epochs
    space = {**values, "seed": tune.grid_search(_final_seeds(spec))}
    baseline = final_baseline(context, best)
    if baseline:
        # The baseline as an arm over the chosen values, in the same grid as the seeds.
        space[ARMS] = tune.grid_search([{}, baseline])
    return tune.Tuner(
        _trainable(final_trial, context),
        param_space=space,
        tune_config=_tune_config(
            context,
            lambda trial: f"{trial.trial_id}_final_{_final_label(trial.config)}",
            lambda trial: f"{trial.trial_id}_{_final_label(trial.config)}",
        ),
        run_config=_run_config(store, final_run_name(best)),
    )


def final_baseline(context: StudyContext, best: dict) -> dict:
    """The baseline's values, or none where the search chose the baseline itself (it would
    train the same runs twice and compare them with themselves)."""
    if not context.spec.final.baseline:
        return {}
    baseline = baseline_arm(context.spec, context.base)
    chosen = trial_values(best["config"])
    return {} if all(chosen.get(k) == v for k, v in baseline.items()) else baseline


def _run(store: StudyStore, run: str, fresh, trainable) -> tune.ResultGrid:
    """Continue ``run`` if an earlier driver left it (finished trials are not rerun), else start."""
    location = store.location(run)
    if tune.Tuner.can_restore(location):
        print(f"resuming {location}", flush=True)
        tuner = tune.Tuner.restore(location, trainable=trainable, resume_errored=True)
    else:
        tuner = fresh()
    return fit(tuner)


# --- driver ------------------------------------------------------------------------------------


def study_root(spec: StudySpec, name: str | None) -> str:
    storage = spec.storage_path
    return f"{storage.rstrip('/')}/{name or spec.name}"


def _context(spec: StudySpec, store: StudyStore) -> StudyContext:
    slots = TrialSlots.remote(spec.search.max_concurrent_trials)
    # A study keeps the trial runner it started with: a study begun before one-worker trials
    # trained in-process (no record) keeps its Ray Train runs, whose checkpoints it resumes.
    runner = store.read_json(STUDY_FILE).get(IN_PROCESS_KEY, False)
    in_process = runner and spec.resources.workers_per_trial == 1
    cpus = study_worker_cpus(spec)
    return StudyContext(spec, store.uri, base_config(spec), slots, cpus, in_process)


def _absolute_data(spec: StudySpec) -> StudySpec:
    """Dataset paths made absolute against the driver's folder: trials run in folders of their
    own, where a relative path would name nothing."""

    data = spec.dataset
    paths = {key: absolute_location(getattr(data, key)) for key in DATASET_PATHS}
    return replace(spec, dataset=replace(data, **paths))


def run_study(spec_path: str | Path, name: str | None = None, address: str | None = None) -> dict:
    """Stages, search, the held-out final step, the report and the export the spec asks for.
    Run again with the same spec and name, a study that stopped continues where it was."""
    if name is not None:
        check_name(name, "--name")
    spec = _absolute_data(load_spec(spec_path))
    spec_text = Path(spec_path).read_text()
    digest = hashlib.sha256(spec_text.encode()).hexdigest()
    _connect(address)
    store = StudyStore(study_root(spec, name))
    check_storage_everywhere(store.uri)
    if store.exists(STUDY_FILE):
        recorded = store.read_json(STUDY_FILE)
        if recorded["spec_sha256"] == digest:
            print(f"continuing the study in {store.uri} (same spec)", flush=True)
            return _prepare_and_complete(_recorded_spec(store), store, store.location(SPEC_FILE))
        if REFUSED_KEY not in recorded:
            raise DataError(
                store.uri,
                "a study of this name exists, made from another spec",
                f"`defectforge study resume {store.uri}` continues it, or pass --name for a new one",
            )
        # Its stages or checks refused it, so no trial ran and no driver is at work in it: the
        # corrected spec takes its place (the stages made so far are kept and reused).
        print(
            f"the study in {store.uri} was refused before its search; starting it from this spec",
            flush=True,
        )
    # Refused before anything is written; a spec with stages is checked once they have run.
    checked = {} if spec.stages.given() else {"dataset_ids": check_study(spec, str(spec_path))}
    store.write_text(SPEC_FILE, spec_text)
    store.write_json(
        STUDY_FILE,
        {
            "name": name or spec.name,
            "root": store.uri,
            "spec_sha256": digest,
            "spec": asdict(spec),
            IN_PROCESS_KEY: spec.resources.one_worker_in_process,
            **checked,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"ray": ray.__version__, "torch": torch.__version__},
        },
    )
    return _prepare_and_complete(spec, store, str(spec_path))


def resume_study(root: str, address: str | None = None) -> dict:
    """Continue a study whose driver stopped: finished stages and trials are not run again."""
    store = StudyStore(root)
    if not store.exists(STUDY_FILE):
        raise DataError(
            store.location(STUDY_FILE), "not a study folder", "pass a folder made by `study run`"
        )
    _connect(address)
    check_storage_everywhere(store.uri)
    return _prepare_and_complete(_recorded_spec(store), store, store.location(SPEC_FILE))


def _recorded_spec(store: StudyStore) -> StudySpec:
    """The stored spec with the dataset paths `study run` resolved."""
    spec = stored_spec(store)
    recorded = store.read_json(STUDY_FILE)["spec"]["dataset"]
    data = replace(spec.dataset, **{key: recorded.get(key, "") for key in DATASET_PATHS})
    return _absolute_data(replace(spec, dataset=data))


def _prepare_and_complete(spec: StudySpec, store: StudyStore, where: str) -> dict:
    """The stages (made, continued or reused), the checks and the study's record, then search,
    final step, report and export."""
    pipeline = Pipeline(spec, where) if spec.stages.given() else None
    study = store.read_json(STUDY_FILE)
    try:
        if pipeline is not None:
            spec = pipeline.run()
        if "dataset_ids" not in study:
            study.update(dataset_ids=check_study(spec, where), spec=asdict(spec))
    except UserError as error:
        if "dataset_ids" not in study:
            store.write_json(STUDY_FILE, {**study, REFUSED_KEY: str(error)})
        raise
    study.pop(REFUSED_KEY, None)
    if pipeline is not None:
        study["stages"] = pipeline.records()
    store.write_json(STUDY_FILE, study)
    summary = _complete(spec, store)
    export = spec.stages.export
    if export is not None:
        target = store.location("export")
        print(f"exporting the chosen model to {target}", flush=True)
        export_study(store.uri, target, True, export.target_recall, export.target_false_alarm)
        summary["export"] = target
    return summary


def _connect(address: str | None) -> None:
    ensure_ray(address)
    ray.data.DataContext.get_current().enable_progress_bars = False


def _complete(spec: StudySpec, store: StudyStore) -> dict:
    context = _context(spec, store)
    if spec.search.algorithm == "compare":
        return _complete_comparison(context, store)
    name = store.read_json(STUDY_FILE)["name"]
    results = _run(
        store, SEARCH_RUN, lambda: _tuner(context, store, name), _trainable(search_trial, context)
    )
    trials = _record_trials(store, results, spec)
    best = trials[0]  # collect_trials sorts best first
    if best[SELECTION_METRIC] is None:
        raise RuntimeError(f"{store.uri}: no trial finished an epoch; see the trial errors above")
    if spec.final.seeds and not store.exists(FINAL_FILE):
        final_results = _run(
            store,
            final_run_name(best),
            lambda: _final_tuner(context, store, best),
            _trainable(final_trial, context),
        )
        chosen_is_baseline = bool(spec.final.baseline) and not final_baseline(context, best)
        summary = summarize_final(trial_records(final_results), best, chosen_is_baseline)
        store.write_json(FINAL_FILE, summary)
    return write_study_report(store)


def _complete_comparison(context: StudyContext, store: StudyStore) -> dict:
    results = _run(
        store,
        COMPARE_RUN,
        lambda: _compare_tuner(context, store),
        _trainable(compare_trial, context),
    )
    _record_trials(store, results, context.spec)
    store.write_json(COMPARE_FILE, summarize_comparison(trial_records(results), context.spec))
    return write_study_report(store)


def _record_trials(store: StudyStore, results: tune.ResultGrid, spec: StudySpec) -> list[dict]:
    """trials.json, best first; a RuntimeError naming the failed trials if any failed."""
    trials = trial_rows(trial_records(results), spec)
    store.write_json(TRIALS_FILE, trials)
    failed = [t["trial"] for t in trials if t["status"] == "error"]
    if failed:
        write_study_report(store)
        raise RuntimeError(
            f"{store.uri}: {len(failed)} trial(s) failed ({', '.join(failed[:3])}...; errors in "
            f"the report); fix the cause and `defectforge study resume {store.uri}` reruns them"
        )
    return trials


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

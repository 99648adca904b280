"""Studies on Ray Tune: every trial is a segmentation run; Optuna or a grid picks them. This is
the driver (stages, checks, the study's record, search, final step, report, export); the trials
are ``trainables.study_trials``, the Tune runs ``trainables.study_tune``.

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
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import ray
import ray.data
import torch
from ray import tune

from defectforge.core.errors import DataError, TrialsFailed, UserError
from defectforge.core.outputs import check_name
from defectforge.core.storage import absolute_location
from defectforge.segmentation.models import absolute_weights
from defectforge.segmentation.selection import SELECTION_METRIC
from defectforge.studies.compare import COMPARE_FILE, summarize_comparison
from defectforge.studies.export import export_study
from defectforge.studies.results import (
    FINAL_FILE,
    SPEC_FILE,
    STUDY_FILE,
    TRIALS_FILE,
    stored_spec,
    summarize_final,
    trial_rows,
    write_study_report,
)
from defectforge.studies.spec import load_spec
from defectforge.studies.spec_schema import DatasetSpec, StudySpec
from defectforge.studies.store import StudyStore
from defectforge.trainables.pipeline import Pipeline
from defectforge.trainables.runtime import check_storage_everywhere, ensure_ray
from defectforge.trainables.slots import TrialSlots
from defectforge.trainables.study_setup import (
    StudyContext,
    base_config,
    check_encoder_weights,
    check_raw_images,
    check_study,
    check_trial_values,
    study_worker_cpus,
    warn_of_missing_resources,
)
from defectforge.trainables.study_tune import (
    SEARCH_RUN,
    compare_run,
    fail_orphaned_asks,
    final_baseline,
    final_run,
    run_tune,
    search_run,
    trial_records,
)
from defectforge.trainables.tracking import MLFLOW_RUN_KEY, log_study, require_mlflow

DATASET_PATHS = tuple(spec.name for spec in DatasetSpec.options())
IN_PROCESS_KEY = "one_worker_in_process"
# Recorded when a study's stages or checks refuse it before its search: then, and only then, a
# `study run` of another spec may take its place.
REFUSED_KEY = "refused_before_search"


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
    warn_of_missing_resources(spec)
    return StudyContext(spec, store.uri, base_config(spec), slots, cpus, in_process)


def _absolute_data(spec: StudySpec) -> StudySpec:
    """Dataset paths made absolute against the driver's folder: trials run in folders of their
    own, where a relative path would name nothing."""

    data = spec.dataset
    paths = {key: absolute_location(getattr(data, key)) for key in DATASET_PATHS}
    training = dict(spec.training)
    if "encoder_weights" in training:
        training["encoder_weights"] = absolute_weights(training["encoder_weights"])
    return replace(spec, dataset=replace(data, **paths), training=training)


def run_study(spec_path: str | Path, name: str | None = None, address: str | None = None) -> dict:
    """Stages, search, the held-out final step, the report and the export the spec asks for.
    Run again with the same spec and name, a study that stopped continues where it was."""
    if name is not None:
        check_name(name, "--name")
    spec = _absolute_data(load_spec(spec_path))
    spec_text = Path(spec_path).read_text()
    digest = _digest(spec_text)
    _connect(address)
    store = StudyStore(study_root(spec, name))
    check_storage_everywhere(store.uri)
    existing = _existing_study(store, digest)
    if existing == "same":
        print(f"continuing the study in {store.uri} (same spec)", flush=True)
        return _prepare_and_complete(_recorded_spec(store), store, store.location(SPEC_FILE))
    if existing == "refused":
        print(
            f"the study in {store.uri} was refused before its search; starting it from this spec",
            flush=True,
        )
    # Refused before anything is written; a spec with stages is checked once they have run.
    check_encoder_weights(spec, str(spec_path))
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


REAL_STAGES = ("data", "subset")
SYNTHETIC_STAGES = ("generate", "label", "generate_masks", "copy_paste", "combine")


def _digest(spec_text: str) -> str:
    """A study's spec identity: the text it was run from."""
    return hashlib.sha256(spec_text.encode()).hexdigest()


def _existing_study(store: StudyStore, digest: str) -> str:
    """What the study folder holds for a spec of ``digest``: "new" (nothing), "same" (a study
    of this spec, to continue) or "refused" (one its stages or checks refused, so no trial
    ran and no driver is at work in it: the corrected spec takes its place, its stages kept);
    a study of another spec is refused."""
    if not store.exists(STUDY_FILE):
        return "new"
    recorded = store.read_json(STUDY_FILE)
    if recorded["spec_sha256"] == digest:
        return "same"
    if REFUSED_KEY in recorded:
        return "refused"
    raise DataError(
        store.uri,
        "a study of this name exists, made from another spec",
        f"`defectforge study resume {store.uri}` continues it, or pass --name for a new one",
    )


def check_spec(spec_path: str | Path, address: str | None = None) -> str:
    """`study check`: every check `study run` makes before it writes or trains anything, and
    what it checked (one line). What stages are still to make is checked as far as it can be:
    given runs at once, search values against the real data once it exists (now, if no stage
    makes it), mixes once the synthetic sets exist."""
    spec = _absolute_data(load_spec(spec_path))
    where = str(spec_path)
    require_mlflow(spec)
    _connect(address)
    check_storage_everywhere(spec.storage_path, "storage_path")
    _existing_study(StudyStore(study_root(spec, None)), _digest(Path(spec_path).read_text()))
    Pipeline(spec, where).check_given_runs()
    check_encoder_weights(spec, where)
    check_raw_images(spec, where)
    before_stages = f"{spec_path}: fine as far as it can be checked before its stages run"
    if any(spec.stages.made(name) for name in REAL_STAGES):
        return f"{before_stages}; `study run` checks its search values once they made the data"
    if any(spec.stages.made(name) for name in SYNTHETIC_STAGES):
        check_trial_values(spec, spec.dataset.real, where)
        return f"{before_stages}; `study run` checks its mixes once they made the synthetic sets"
    ids = check_study(spec, where)
    warn_of_missing_resources(spec)
    datasets = ", ".join(f"{key} {value}" for key, value in ids.items())
    return (
        f"{spec_path}: ready to run (datasets {datasets}; every value of the search space, "
        f"every mix and the resources checked); `defectforge study run {spec_path}` runs it"
    )


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


def search_results(root: str) -> tune.ResultGrid:
    """A study's search as Ray Tune's own ``ResultGrid``, read from its folder (local or a URI;
    nothing is resumed): ``get_best_result(SELECTION_METRIC, "max")``, each trial's metrics, and a
    one-worker trial's best and latest epoch models as its checkpoints (``load_model`` reads
    them)."""
    location = StudyStore(root).location(SEARCH_RUN)
    if not tune.Tuner.can_restore(location):
        raise DataError(location, "no Tune search here", "pass a study folder made by `study run`")
    return tune.ResultGrid(tune.ExperimentAnalysis(location))


def _recorded_spec(store: StudyStore) -> StudySpec:
    """The stored spec with the dataset and weights paths `study run` resolved."""
    spec = stored_spec(store)
    recorded = store.read_json(STUDY_FILE)["spec"]
    data = replace(spec.dataset, **{key: recorded["dataset"].get(key, "") for key in DATASET_PATHS})
    weights = recorded.get("training", {}).get("encoder_weights")
    training = {**spec.training, "encoder_weights": weights} if weights else spec.training
    return _absolute_data(replace(spec, dataset=data, training=training))


def _prepare_and_complete(spec: StudySpec, store: StudyStore, where: str) -> dict:
    """The stages (made, continued or reused), the checks and the study's record, then search,
    final step, report and export."""
    require_mlflow(spec)
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
    recorded = store.read_json(STUDY_FILE)
    run = recorded.get(MLFLOW_RUN_KEY)
    # Once per study: a resume of a finished study does not add another study run.
    if run is None and (run := log_study(spec, store, summary)):
        print(f"tracked in MLflow at {spec.tracking.mlflow}: study run {run}", flush=True)
        store.write_json(STUDY_FILE, {**recorded, MLFLOW_RUN_KEY: run})
    summary["mlflow_run"] = run
    return summary


def _connect(address: str | None) -> None:
    ensure_ray(address)
    ray.data.DataContext.get_current().enable_progress_bars = False


def _complete(spec: StudySpec, store: StudyStore) -> dict:
    context = _context(spec, store)
    if spec.search.algorithm == "compare":
        return _complete_comparison(context, store)
    name = store.read_json(STUDY_FILE)["name"]
    if orphans := fail_orphaned_asks(spec, store, name):
        print(f"{orphans} Optuna trial(s) asked before the stop and never run: marked failed")
    results = run_tune(store, search_run(context, store, name))
    trials = _record_trials(store, results, spec)
    best = trials[0]  # collect_trials sorts best first
    if best[SELECTION_METRIC] is None:
        raise RuntimeError(f"{store.uri}: no trial finished an epoch; see the trial errors above")
    if spec.final.seeds and not store.exists(FINAL_FILE):
        final_results = run_tune(store, final_run(context, store, best))
        chosen_is_baseline = bool(spec.final.baseline) and not final_baseline(context, best)
        summary = summarize_final(trial_records(final_results), best, chosen_is_baseline)
        store.write_json(FINAL_FILE, summary)
    return write_study_report(store)


def _complete_comparison(context: StudyContext, store: StudyStore) -> dict:
    results = run_tune(store, compare_run(context, store))
    _record_trials(store, results, context.spec)
    store.write_json(COMPARE_FILE, summarize_comparison(trial_records(results), context.spec))
    return write_study_report(store)


def _record_trials(store: StudyStore, results: tune.ResultGrid, spec: StudySpec) -> list[dict]:
    """trials.json, best first; ``TrialsFailed`` with the first failed trial's error if any
    failed."""
    trials = trial_rows(trial_records(results), spec)
    store.write_json(TRIALS_FILE, trials)
    failed = [t for t in trials if t["status"] == "error"]
    if failed:
        write_study_report(store)
        raise TrialsFailed(
            f"{store.uri}: {len(failed)} of {len(trials)} trials failed, the first with "
            f"{failed[0]['error']!r} (each error in the report); fix the cause and "
            f"`defectforge study resume {store.uri}` reruns them"
        )
    return trials

"""Studies on Ray Tune: every trial is a Ray Train segmentation run; Optuna or a grid picks them.

A study folder (``storage_path/name``, local or a pyarrow URI) holds::

    spec.yaml, study.json     the spec as given, and what it resolved to (data ids, versions)
    search/                   the Tune experiment (Tuner.restore resumes it)
    final/                    the Tune run of the held-out step: the best configuration, >= 3 seeds
    train/<trial>/            each trial's Ray Train run: per-epoch checkpoints
    trials.json, final.json   one row per trial; test metrics per seed with the 95% interval
    report/                   report.md and its PNGs (written by ``defectforge.studies.report``)

The search reads only train and val: every search trial runs inside ``sealed_splits("test")``,
which makes ``read_split`` refuse the test split. Only the final step reads it.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data
import torch
import yaml
from ray import tune
from ray.train import Checkpoint
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from defectforge.datasets.contract import decode_png, read_manifest, split_dir
from defectforge.datasets.mix import NotEnoughSynthetic
from defectforge.segmentation.checkpoint import load_model
from defectforge.segmentation.config import SegConfig
from defectforge.segmentation.export import export_model
from defectforge.studies.report import write_report
from defectforge.studies.spec import (
    METRIC,
    Range,
    SpecError,
    StudySpec,
    load_spec,
    parse_spec,
)
from defectforge.studies.stats import mean_interval
from defectforge.studies.store import StudyStore, absolute_location, is_uri
from defectforge.trainables.data_jobs import sealed_splits
from defectforge.trainables.mix import check_compatible, plan_for
from defectforge.trainables.runtime import check_shared_storage, ensure_ray
from defectforge.trainables.seg import (
    best_checkpoint,
    config_from_manifest,
    evaluate_split,
    make_trainer,
)
from defectforge.trainables.slots import TrialSlots, trial_slot

SPEC_FILE, STUDY_FILE = "spec.yaml", "study.json"
TRIALS_FILE, FINAL_FILE = "trials.json", "final.json"
SEARCH_RUN, FINAL_RUN, TRAIN_RUNS, REPORT_DIR = "search", "final", "train", "report"
# Final retrains use seeds the search never used, so the interval is an honest estimate.
FINAL_SEED_BASE = 1000
# A Tune trial only drives its Ray Train run, whose workers hold the trial's CPUs and GPUs. Even
# 0.01 CPU here would leave a 2-CPU machine 0.99 CPU beside one worker: too little for a Ray Data
# read task (1 CPU), and the study would stall. Memory alone reserves nothing the others need.
DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}
VERIFY_IMAGES = 8


@dataclass(frozen=True)
class StudyContext:
    """What every trial needs besides its sampled values."""

    spec: StudySpec
    root: str
    base: SegConfig
    slots: Any = None  # a TrialSlots actor: max_concurrent_trials, restored studies included

    def trial_config(self, values: dict) -> SegConfig:
        values = dict(values)
        ratio = values.get("synthetic_ratio", 0.0)
        return replace(self.base, **values, synthetic=self.spec.dataset.synthetic if ratio else "")

    def worker_resources(self) -> dict:
        res = self.spec.resources
        per_worker = {"CPU": res.cpus_per_trial / res.workers_per_trial, **res.custom_per_worker}
        if res.gpus_per_trial:
            per_worker["GPU"] = res.gpus_per_trial / res.workers_per_trial
        return per_worker


def base_config(spec: StudySpec) -> SegConfig:
    """The trial config before the search space's values: data, sizes, resources."""
    res, training, data = spec.resources, spec.training, spec.dataset
    cpus_per_worker = res.cpus_per_trial / res.workers_per_trial
    return config_from_manifest(
        data.real,
        binary=data.binary,
        image_size=data.image_size,
        crop_size=data.crop_size,
        encoder_weights=training.encoder_weights or None,
        max_steps_per_epoch=training.max_steps_per_epoch,
        threads=training.threads or max(1, int(cpus_per_worker)),
        workers=res.workers_per_trial,
        use_gpu=res.gpus_per_trial > 0,
    )


# --- trials (run inside Tune's trial actors) ---------------------------------------------------


def _fit(context: StudyContext, values: dict, run_name: str):
    ray.data.DataContext.get_current().enable_progress_bars = False
    with trial_slot(context.slots, tune.get_context().get_trial_id()):
        trainer = make_trainer(
            context.trial_config(values),
            context.root + f"/{TRAIN_RUNS}",
            run_name,
            resources_per_worker=context.worker_resources(),
            callbacks=(TuneReportCallback(),),
        )
        return trainer.fit()


def search_trial(config: dict, context: StudyContext) -> None:
    with sealed_splits("test"):
        _fit(context, config, tune.get_context().get_trial_id())


def final_trial(config: dict, context: StudyContext) -> None:
    with sealed_splits("test"):
        # The run name carries the final run's (and so the chosen trial's) name: a resumed study
        # whose best trial changed never restores another configuration's checkpoints.
        result = _fit(
            context, config, f"{tune.get_context().get_experiment_name()}-seed{config['seed']}"
        )
    checkpoint, metrics = best_checkpoint(result)
    with checkpoint.as_directory() as folder:
        test = evaluate_split(folder, "test")
    tune.report(
        {
            "seed": config["seed"],
            "best_epoch": metrics["epoch"],
            "best_val_binary_defect_iou": metrics[METRIC],
            "test_binary_defect_iou": test["binary_defect_iou"],
            "test_mean_defect_iou": test["mean_defect_iou"],
            "test": test,
            "best_checkpoint_path": checkpoint.path,
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
    grid = spec.search.algorithm == "grid"
    return {key: _tune_domain(value, grid) for key, value in spec.search_space.items()}


ABBREVIATIONS = {"synthetic_ratio": "ratio", "aug_strength": "aug", "tversky_alpha": "alpha"}


def trial_label(trial, searched: tuple[str, ...]) -> str:
    """``<id>_arch=pan,ratio=0.38``: readable in the Ray dashboard and as a folder name."""

    def short(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    parts = [f"{ABBREVIATIONS.get(k, k)}={short(trial.config.get(k))}" for k in searched]
    return re.sub(r"[^\w=.,+-]", "_", f"{trial.trial_id}_" + ",".join(parts))[:120]


def _searcher(spec: StudySpec, name: str):
    if spec.search.algorithm == "grid":
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
    epochs = spec.search_space.get("epochs", SegConfig.__dataclass_fields__["epochs"].default)
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
    return tune.with_resources(tune.with_parameters(function, context=context), DRIVER_RESOURCES)


def _tuner(context: StudyContext, store: StudyStore, name: str) -> tune.Tuner:
    spec = context.spec
    label = partial(trial_label, searched=tuple(sorted(spec.searched())))
    return tune.Tuner(
        _trainable(search_trial, context),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            search_alg=_searcher(spec, name),
            scheduler=_scheduler(spec),
            num_samples=spec.search.num_samples,
            max_concurrent_trials=spec.search.max_concurrent_trials,
            trial_name_creator=label,
            trial_dirname_creator=label,
        ),
        run_config=tune.RunConfig(
            name=SEARCH_RUN,
            storage_path=store.uri,
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )


def final_run_name(best: dict) -> str:
    """``final-<trial id>``: one final run per chosen trial."""
    return f"{FINAL_RUN}-{'_'.join(best['trial'].split('_')[:2])}"


def _final_tuner(context: StudyContext, store: StudyStore, best: dict) -> tune.Tuner:
    spec = context.spec
    values = dict(best["config"])
    if spec.final.epochs:
        values["epochs"] = spec.final.epochs
    seeds = [FINAL_SEED_BASE + i for i in range(spec.final.seeds)]
    return tune.Tuner(
        _trainable(final_trial, context),
        param_space={**values, "seed": tune.grid_search(seeds)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=spec.search.max_concurrent_trials,
            trial_name_creator=lambda trial: f"{trial.trial_id}_final_seed={trial.config['seed']}",
            trial_dirname_creator=lambda trial: f"{trial.trial_id}_seed={trial.config['seed']}",
        ),
        run_config=tune.RunConfig(
            name=final_run_name(best),
            storage_path=store.uri,
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )


def _run(store: StudyStore, run: str, fresh, trainable) -> tune.ResultGrid:
    """Continue ``run`` if an earlier driver left it (finished trials are not rerun), else start."""
    location = store.location(run)
    if tune.Tuner.can_restore(location):
        print(f"resuming {location}", flush=True)
        tuner = tune.Tuner.restore(location, trainable=trainable, resume_errored=True)
    else:
        tuner = fresh()
    return tuner.fit()


# --- checks before anything runs ---------------------------------------------------------------


def check_study(spec: StudySpec, where: str) -> dict:
    """Refuse what would fail or hang later: data, test split, configs, resources."""
    manifest = read_manifest(spec.dataset.real)
    ids = {"real": manifest["dataset_id"]}
    if spec.dataset.synthetic:
        ids["synthetic"] = check_compatible(spec.dataset.real, spec.dataset.synthetic)[1][
            "dataset_id"
        ]
    if spec.final.seeds and not manifest["counts"]["test"]["total"]:
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
            except ValueError as err:
                raise SpecError(
                    where, f"search_space.{key}", candidate, str(err), "change the value"
                ) from None
    _check_resources(spec, where)
    return ids


def _check_enough_synthetic(spec: StudySpec, base: SegConfig, where: str) -> None:
    """A trial asking for more synthetic images than exist would only fail once it ran."""
    ratios = spec.search_space.get("synthetic_ratio", 0.0)
    largest = ratios.high if isinstance(ratios, Range) else max(_as_list(ratios))
    if not largest:
        return
    mix = replace(base, synthetic=spec.dataset.synthetic, synthetic_ratio=largest).mix_config()
    try:
        plan_for(spec.dataset.real, spec.dataset.synthetic, mix)
    except NotEnoughSynthetic as err:
        raise SpecError(
            where,
            "search_space.synthetic_ratio",
            largest,
            str(err).split(";")[0],
            "lower the largest ratio or generate and label more images",
        ) from None


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _check_resources(spec: StudySpec, where: str) -> None:
    res, concurrent = spec.resources, spec.search.max_concurrent_trials
    cpus = ray.cluster_resources().get("CPU", 0)
    if not res.gpus_per_trial and cpus and concurrent * res.cpus_per_trial > cpus - 1:
        raise SpecError(
            where,
            "resources.cpus_per_trial",
            res.cpus_per_trial,
            f"{concurrent} concurrent trial(s) x {res.cpus_per_trial} CPU leave no CPU for "
            f"Ray Data reading on this {cpus:g}-CPU cluster (the study would stall)",
            "lower search.max_concurrent_trials or resources.cpus_per_trial",
        )


# --- driver ------------------------------------------------------------------------------------


def study_root(spec: StudySpec, name: str | None) -> str:
    storage = spec.storage_path
    return f"{storage.rstrip('/')}/{name or spec.name}"


def _context(spec: StudySpec, store: StudyStore) -> StudyContext:
    slots = TrialSlots.remote(spec.search.max_concurrent_trials)
    return StudyContext(spec, store.uri, base_config(spec), slots)


def _absolute_data(spec: StudySpec) -> StudySpec:
    """Dataset paths made absolute against the driver's folder: trials run in folders of their
    own, where a relative path would name nothing."""

    data = spec.dataset
    return replace(
        spec,
        dataset=replace(
            data, real=absolute_location(data.real), synthetic=absolute_location(data.synthetic)
        ),
    )


def run_study(spec_path: str | Path, name: str | None = None, address: str | None = None) -> dict:
    """Search, then the held-out final step, then the report. Returns the study summary."""
    spec = _absolute_data(load_spec(spec_path))
    spec_text = Path(spec_path).read_text()
    _connect(address)
    store = StudyStore(study_root(spec, name))
    check_shared_storage(store.uri)
    if store.exists(STUDY_FILE):
        raise FileExistsError(
            f"{store.uri}: a study of this name exists; `defectforge study resume {store.uri}` "
            "continues it, or pass --name for a new one"
        )
    ids = check_study(spec, str(spec_path))
    store.write_text(SPEC_FILE, spec_text)
    store.write_json(
        STUDY_FILE,
        {
            "name": name or spec.name,
            "root": store.uri,
            "spec_sha256": hashlib.sha256(spec_text.encode()).hexdigest(),
            "spec": asdict(spec),
            "dataset_ids": ids,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"ray": ray.__version__, "torch": torch.__version__},
        },
    )
    return _complete(spec, store)


def resume_study(root: str, address: str | None = None) -> dict:
    """Continue a study whose driver stopped: unfinished trials run, finished ones do not."""
    store = StudyStore(root)
    if not store.exists(STUDY_FILE):
        raise FileNotFoundError(f"{root}: no {STUDY_FILE}; pass a folder made by `study run`")
    _connect(address)
    check_shared_storage(store.uri)
    spec = parse_spec(yaml.safe_load(store.read_text(SPEC_FILE)), store.location(SPEC_FILE))
    recorded = store.read_json(STUDY_FILE)["spec"]["dataset"]  # as resolved by `study run`
    data = replace(spec.dataset, real=recorded["real"], synthetic=recorded["synthetic"])
    return _complete(_absolute_data(replace(spec, dataset=data)), store)


def _connect(address: str | None) -> None:
    if address and address.startswith("http"):
        raise ValueError(
            f"--address {address}: a dashboard (Jobs API) address; give a Ray address "
            "(auto or ray://HOST:10001) here"
        )
    ensure_ray(address)
    ray.data.DataContext.get_current().enable_progress_bars = False


def _complete(spec: StudySpec, store: StudyStore) -> dict:
    context = _context(spec, store)
    name = store.read_json(STUDY_FILE)["name"]
    results = _run(
        store, SEARCH_RUN, lambda: _tuner(context, store, name), _trainable(search_trial, context)
    )
    trials = collect_trials(results, spec)
    store.write_json(TRIALS_FILE, trials)
    failed = [t["trial"] for t in trials if t["status"] == "error"]
    if failed:
        write_study_report(store)
        raise RuntimeError(
            f"{store.uri}: {len(failed)} trial(s) failed ({', '.join(failed[:3])}...; errors in "
            f"the report); fix the cause and `defectforge study resume {store.uri}` reruns them, "
            "then the final step"
        )
    best = trials[0]  # collect_trials sorts best first
    if best[METRIC] is None:
        raise RuntimeError(f"{store.uri}: no trial finished an epoch; see the trial errors above")
    if spec.final.seeds and not store.exists(FINAL_FILE):
        final_results = _run(
            store,
            final_run_name(best),
            lambda: _final_tuner(context, store, best),
            _trainable(final_trial, context),
        )
        store.write_json(FINAL_FILE, summarize_final(final_results, best))
    return write_study_report(store)


# --- results -----------------------------------------------------------------------------------


def _result_lines(result) -> list[dict]:
    path = f"{result.path}/result.json"
    try:
        with result.filesystem.open_input_stream(path) as stream:
            text = stream.read().decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def collect_trials(results: tune.ResultGrid, spec: StudySpec) -> list[dict]:
    """One row per trial: its values, status and its best epoch's validation metrics."""
    rows = []
    for result in results:
        epochs = [line for line in _result_lines(result) if line.get(METRIC) is not None]
        best = max(epochs, key=lambda line: line[METRIC]) if epochs else {}
        planned = result.config.get("epochs", SegConfig.__dataclass_fields__["epochs"].default)
        status = (
            "error" if result.error else "finished" if len(epochs) >= planned else "stopped early"
        )
        rows.append(
            {
                "trial": Path(result.path).name,
                "config": {k: result.config.get(k) for k in spec.search_space},
                "status": status,
                "epochs_run": len(epochs),
                "best_epoch": best.get("epoch"),
                METRIC: best.get(METRIC),
                "val_mean_defect_iou": best.get("val_mean_defect_iou"),
                "val_per_class_iou": best.get("val_per_class_iou"),
                "val_confusion_matrix": best.get("val_confusion_matrix"),
                "checkpoint_path": best.get("checkpoint_path"),
                "seconds": sum(line.get("epoch_seconds", 0.0) for line in epochs),
                "nodes": sorted({line["node_id"] for line in epochs if line.get("node_id")}),
                "error": str(result.error).splitlines()[0][:300] if result.error else None,
            }
        )
    return sorted(rows, key=lambda row: row[METRIC] or -1.0, reverse=True)


def summarize_final(results: tune.ResultGrid, best: dict) -> dict:
    seeds = []
    for result in results:
        lines = [line for line in _result_lines(result) if "test_binary_defect_iou" in line]
        if result.error or not lines:
            raise RuntimeError(f"final seed run {result.path} failed: {result.error}")
        seeds.append({k: v for k, v in lines[-1].items() if k in FINAL_KEYS})
    seeds.sort(key=lambda row: row["seed"])
    return {
        "config": best["config"],
        "from_trial": best["trial"],
        "seeds": seeds,
        "test_binary_defect_iou": mean_interval([s["test_binary_defect_iou"] for s in seeds]),
        "test_mean_defect_iou": mean_interval([s["test_mean_defect_iou"] or 0.0 for s in seeds]),
        "val_binary_defect_iou": mean_interval([s["best_val_binary_defect_iou"] for s in seeds]),
    }


FINAL_KEYS = (
    "seed",
    "best_epoch",
    "best_val_binary_defect_iou",
    "test_binary_defect_iou",
    "test_mean_defect_iou",
    "test",
    "best_checkpoint_path",
)


def write_study_report(store: StudyStore) -> dict:
    """Render report.md and its PNGs from the study's files; returns the summary it shows."""
    study = store.read_json(STUDY_FILE)
    trials = store.read_json(TRIALS_FILE)
    final = store.read_json(FINAL_FILE) if store.exists(FINAL_FILE) else None
    spec = parse_spec(yaml.safe_load(store.read_text(SPEC_FILE)), store.location(SPEC_FILE))
    with tempfile.TemporaryDirectory(prefix="defectforge-report-") as folder:
        summary = write_report(Path(folder), spec, study, trials, final)
        store.upload_folder(folder, REPORT_DIR)
    return {**summary, "location": store.location(f"{REPORT_DIR}/{summary['report']}")}


def report_only(root: str) -> dict:
    store = StudyStore(root)
    if not store.exists(TRIALS_FILE):
        raise FileNotFoundError(
            f"{root}: no {TRIALS_FILE} yet; `defectforge study resume {root}` finishes the study"
        )
    return write_study_report(store)


# --- export ------------------------------------------------------------------------------------


def _chosen_model(store: StudyStore) -> tuple[str, dict]:
    """The checkpoint to ship: the final seed with the best validation score (its test score is
    known), else the search's best trial."""
    trials = store.read_json(TRIALS_FILE)
    if store.exists(FINAL_FILE):
        final = store.read_json(FINAL_FILE)
        seed = max(final["seeds"], key=lambda s: s["best_val_binary_defect_iou"])
        metrics = {
            "val_binary_defect_iou": seed["best_val_binary_defect_iou"],
            "test_binary_defect_iou": seed["test_binary_defect_iou"],
            "test_mean_defect_iou": seed["test_mean_defect_iou"],
            "final_test_binary_defect_iou_interval": final["test_binary_defect_iou"],
            "chosen": f"final run, seed {seed['seed']} (best validation of the final seeds)",
        }
        return seed["best_checkpoint_path"], metrics
    best = next(t for t in trials if t[METRIC] is not None)
    metrics = {
        "val_binary_defect_iou": best[METRIC],
        "chosen": f"search trial {best['trial']} (no final step: no test score)",
    }
    return best["checkpoint_path"], metrics


def verification_images(cfg: SegConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """Up to VERIFY_IMAGES real validation images of the split's most common size, and the
    largest image size of train and val (the export's padded input in pad mode)."""
    sizes = [
        pq.read_table(split_dir(cfg.data, s), columns=["height", "width"]) for s in ("train", "val")
    ]
    largest = (
        max(max(t["height"].to_pylist(), default=0) for t in sizes),
        max(max(t["width"].to_pylist(), default=0) for t in sizes),
    )
    val = pq.read_table(split_dir(cfg.data, "val"), columns=["image", "height", "width"])
    shapes = list(zip(val["height"].to_pylist(), val["width"].to_pylist(), strict=True))
    common = max(set(shapes), key=shapes.count)
    cells = [c for c, s in zip(val["image"].to_pylist(), shapes, strict=True) if s == common]
    images = np.stack([decode_png(cell, cfg.channels) for cell in cells[:VERIFY_IMAGES]])
    return images, largest


def export_study(root: str, out: str | Path, overwrite: bool = False) -> dict:
    store = StudyStore(root)
    if not store.exists(TRIALS_FILE):
        raise FileNotFoundError(f"{root}: no {TRIALS_FILE}; run or resume the study first")
    study = store.read_json(STUDY_FILE)
    path, metrics = _chosen_model(store)
    checkpoint = Checkpoint(path, filesystem=None if not is_uri(root) else store.fs)
    with checkpoint.as_directory() as folder:
        model, cfg = load_model(folder)
    images, largest = verification_images(cfg)
    details = {
        "metrics": metrics,
        "study": {
            "name": study["name"],
            "root": study["root"],
            "spec_sha256": study["spec_sha256"],
        },
        "data": {
            "real_manifest_id": study["dataset_ids"]["real"],
            "synthetic_manifest_id": study["dataset_ids"].get("synthetic"),
            "synthetic_ratio": cfg.synthetic_ratio,
        },
        "checkpoint": path,
    }
    details.update(input_conversion(cfg.data))
    return export_model(model, cfg, images, out, largest, details, overwrite)


def input_conversion(data: str) -> dict:
    """What an export must record for `predict` to turn raw input into what the model saw: for
    steel, the rule from a rig's maps or captures to the RGB image."""
    build = read_manifest(data).get("config", {})
    return {"steel": build["steel"]} if build.get("source") == "steel" else {}

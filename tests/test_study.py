"""Studies on the shared local Ray: sealing of the test split, checks before running, an
interrupted and resumed 2-trial study with its final step, report and export."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from cli_checks import error_lines

from defectforge.segmentation.selection import SELECTION_METRIC
from defectforge.studies.errors import SpecError
from defectforge.studies.spec import parse_spec
from defectforge.studies.spec_schema import Range
from defectforge.studies.stats import mean_interval

# Images resized to 64 px: a trial's validation pass then costs a tenth of the full 200 px one.
STUDY_TRAINING = {"max_steps_per_epoch": 2, "image_size": 64}


def study_spec(data: Path, storage: Path, synthetic: Path | None = None, **changes) -> dict:
    spec = {
        "name": "t",
        "dataset": {"real": str(data)},
        "search_space": {"synthetic_ratio": 0.0, "epochs": 2, "batch_size": 4},
        "search": {"algorithm": "grid"},
        "training": {**STUDY_TRAINING, "crop_size": 64},
        "storage_path": str(storage),
        "final": {"seeds": 3},
    }
    if synthetic:
        spec["dataset"]["synthetic"] = str(synthetic)
        spec["search_space"]["synthetic_ratio"] = [0.0, 0.4]
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    return spec


@pytest.mark.floors
def test_mean_interval_is_the_student_t_interval():
    values = [0.60, 0.64, 0.62]
    interval = mean_interval(values)
    # t(0.975, 2 degrees of freedom) = 4.3027; sd = 0.02
    assert interval["mean"] == pytest.approx(0.62)
    assert interval["half_width"] == pytest.approx(4.302653 * 0.02 / 3**0.5, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        mean_interval([0.5])


@pytest.mark.floors
def test_search_space_becomes_tune_domains_and_readable_trial_names():
    from ray.tune.search.sample import Categorical, Float, Integer

    from defectforge.trainables.study_tune import param_space, trial_label

    spec = parse_spec(
        {
            "name": "s",
            "dataset": {"real": "x"},
            "search_space": {
                "arch": ["pan", "deeplabv3plus"],
                "lr": {"low": 1e-4, "high": 1e-2, "log": True},
                "epochs": {"low": 2, "high": 6},
                "batch_size": 8,
            },
        }
    )
    space = param_space(spec)
    assert isinstance(space["arch"], Categorical) and space["batch_size"] == 8
    assert isinstance(space["lr"], Float) and isinstance(space["epochs"], Integer)
    assert space["epochs"].upper == 7  # randint's upper bound is exclusive; the spec's is not
    grid_spec = {"name": "g", "dataset": {"real": "x"}, "search": {"algorithm": "grid"}}
    grid = param_space(parse_spec({**grid_spec, "search_space": {"arch": ["pan", "unet"]}}))
    assert grid["arch"] == {"grid_search": ["pan", "unet"]}

    class Trial:
        trial_id = "ab12c_00003"
        config = {"arch": "pan", "synthetic_ratio": 0.38}

    assert trial_label(Trial, ("arch", "synthetic_ratio")) == "ab12c_00003_arch=pan,ratio=0.38"
    assert trial_label(Trial, ()) == "ab12c_00003"


def test_an_optuna_spec_with_nothing_searched_runs_plain_repeats():
    from defectforge.trainables.study_tune import _searcher

    fixed = parse_spec({"name": "f", "dataset": {"real": "x"}, "search_space": {"epochs": 1}})
    assert fixed.search.algorithm == "optuna" and _searcher(fixed, "f") is None


@pytest.mark.floors
def test_optuna_storage_takes_a_file_or_a_url(tmp_path):
    import optuna

    from defectforge.trainables.study_tune import optuna_url

    url = optuna_url(str(tmp_path / "new" / "s.db"))
    assert url == f"sqlite:///{tmp_path / 'new' / 's.db'}"
    optuna.create_study(storage=url, study_name="s")  # the folder was made; the URL works
    assert (tmp_path / "new" / "s.db").is_file()
    assert optuna_url("postgresql://db/optuna") == "postgresql://db/optuna"


def test_two_concurrent_trials_on_two_cpus_finish_and_run_again_from_a_half_written_state(
    sample_with_test, tmp_path
):
    """As many trial workers as the session has CPUs: each gets half, Ray Data keeps one. A
    driver killed while Tune wrote its state leaves a file Tune cannot read, and Tune starts
    the run over: from the spec's search space, not from an empty one."""
    from defectforge.studies.results import TRIALS_FILE
    from defectforge.trainables.study import resume_study, run_study

    spec = study_spec(
        sample_with_test,
        tmp_path,
        search={"max_concurrent_trials": 2},
        search_space={"arch": ["unet", "fpn"], "epochs": 1, "batch_size": 4},
        final={"seeds": 0},
    )
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    run_study(spec_file)
    root = tmp_path / "t"
    trials = json.loads((root / TRIALS_FILE).read_text())
    assert sorted(t["config"]["arch"] for t in trials) == ["fpn", "unet"]
    assert {t["status"] for t in trials} == {"finished"}

    (state,) = (root / "search").glob("experiment_state-*.json")
    state.write_text(state.read_text()[:200])
    resume_study(str(root))
    again = json.loads((root / TRIALS_FILE).read_text())
    assert {t["trial"] for t in again}.isdisjoint(t["trial"] for t in trials)  # ran again
    assert sorted(t["config"]["arch"] for t in again) == ["fpn", "unet"]
    assert {(t["status"], t["epochs_run"], t["config"]["batch_size"]) for t in again} == {
        ("finished", 1, 4)
    }


def test_the_test_split_is_sealed_during_a_search(sample_with_test):
    from defectforge.core.errors import DataError
    from defectforge.trainables.data_jobs import read_split, sealed_splits

    with sealed_splits("test"):
        read_split(sample_with_test, "val")
        with pytest.raises(DataError, match="test split is sealed while a study searches"):
            read_split(sample_with_test, "test")
    assert read_split(sample_with_test, "test").count() == 7


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"final": {"seeds": 3}}, r"final.seeds = 3: the dataset .* has no test split"),
        (
            {"search_space": {"arch": "pan", "epochs": 1}},
            r"search_space.arch = 'pan': image_size = 64: pan needs inputs of at least 128 px",
        ),
        (
            {"search_space": {"synthetic_ratio": [0.0, 0.5]}},
            r"synthetic_ratio = 0.5: ratio 0.5 over 35 real train images needs 35 synthetic "
            r"images, only 32 exist; lower the largest ratio",
        ),
        (
            {"search_space": {"synthetic_ratio": [0.0, 0.3], "real_count": [0, 8]}},
            r"search_space.real_count = 8: keeps fewer real images .*; give a "
            r"synthetic_ratio > 0 with it$",
        ),
        (  # batches and crops the data cannot fill would fail in the trials
            {"search_space": {"batch_size": [4, 40]}},
            r"search_space.batch_size = 40: the train split gives 35 images per epoch, fewer "
            r"than one batch, .*; set batch_size \(--batch-size\) to 35 or less$",
        ),
        (
            {"training": {"crop_size": 128}},
            r"training.crop_size = 128: larger than every train image \(the images are resized "
            r"to 64 px\)",
        ),
        (  # the baseline's own mix is planned like every trial's
            {
                "search_space": {"synthetic_ratio": [0.0, 0.3]},
                "final": {"seeds": 3, "baseline": {"synthetic_ratio": 0.5}},
            },
            r"final.baseline.synthetic_ratio = 0.5: ratio 0.5 over 35 real train images needs 35",
        ),
    ],
)
def test_a_study_that_would_fail_or_stall_is_refused_before_it_runs(
    changes, message, sample_dataset, sample_with_test, labelled_with_test, tmp_path
):
    from defectforge.trainables.study_setup import check_study

    data = sample_dataset if changes == {"final": {"seeds": 3}} else sample_with_test
    synthetic = labelled_with_test if "synthetic_ratio" in changes.get("search_space", {}) else None
    spec = parse_spec(study_spec(data, tmp_path, synthetic, **changes))
    with pytest.raises(SpecError, match=message):
        check_study(spec, "spec.yaml")


def test_encoder_weights_no_trial_could_read_are_refused_before_any_stage(
    sample_with_test, tmp_path
):
    import torch

    from defectforge.trainables.seg import config_from_manifest
    from defectforge.trainables.study_setup import check_encoder_weights

    weights = tmp_path / "weights" / "resnet18.pt"
    spec = parse_spec(
        study_spec(sample_with_test, tmp_path, training={"encoder_weights": str(weights)})
    )
    with pytest.raises(SpecError, match=r"training.encoder_weights = .*: no such file; give a"):
        check_encoder_weights(spec, "spec.yaml")
    weights.parent.mkdir()
    weights.write_bytes(b"not a state dict")
    with pytest.raises(SpecError, match="encoder_weights = .*: encoder weights file is damaged"):
        check_encoder_weights(spec, "spec.yaml")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, weights)
    check_encoder_weights(spec, "spec.yaml")
    # Trials and workers run in folders of their own: a relative path is made absolute here.
    relative = os.path.relpath(weights)
    cfg = config_from_manifest(sample_with_test, encoder_weights=relative)
    assert cfg.encoder_weights == str(weights.resolve())
    # and in the spec `study run` records, which `study resume` from another folder reads
    from defectforge.trainables.study import _absolute_data

    spec = parse_spec(
        study_spec(sample_with_test, tmp_path, training={"encoder_weights": relative})
    )
    assert _absolute_data(spec).training["encoder_weights"] == str(weights.resolve())


def test_study_check_runs_the_checks_and_writes_nothing(
    sample_with_test, labelled_with_test, tmp_path, capsys
):
    import ray

    from defectforge.cli import main

    address = ray.get_runtime_context().gcs_address
    spec_file, storage = tmp_path / "spec.yaml", tmp_path / "storage"
    spec = study_spec(sample_with_test, storage, labelled_with_test)
    spec_file.write_text(yaml.safe_dump(spec))
    assert main(["study", "check", str(spec_file), "--address", address]) == 0
    assert "ready to run (datasets real " in capsys.readouterr().out
    # Each arm's batch is checked against its own mix: 35 real + 23 synthetic rows hold 40.
    spec["search_space"] = {
        "epochs": 1,
        "arms": [
            {"synthetic_ratio": 0.0, "batch_size": 8},
            {"synthetic_ratio": 0.4, "batch_size": 40},
        ],
    }
    spec["search"] = {"algorithm": "compare"}
    spec_file.write_text(yaml.safe_dump(spec))
    assert main(["study", "check", str(spec_file), "--address", address]) == 0
    spec["search_space"]["arms"][0]["batch_size"] = 40  # the real-only arm has 35 rows
    spec_file.write_text(yaml.safe_dump(spec))
    assert main(["study", "check", str(spec_file), "--address", address]) == 2
    err = capsys.readouterr().err
    assert (
        len(error_lines(err)) == 1
        and "search_space.batch_size = 40: the train split gives 35" in err
    )
    assert not (storage / "t").exists()
    # A study of this name from another spec: `study run` would refuse it, and so does check.
    (storage / "t").mkdir(parents=True)
    (storage / "t" / "study.json").write_text(json.dumps({"spec_sha256": "another"}))
    assert main(["study", "check", str(spec_file), "--address", address]) == 2
    assert "a study of this name exists, made from another spec" in capsys.readouterr().err


def test_a_chosen_configuration_equal_to_its_baseline_trains_once(
    sample_with_test, labelled_with_test, tmp_path
):
    from defectforge.studies.report import _baseline_lines
    from defectforge.trainables.study_setup import StudyContext, base_config
    from defectforge.trainables.study_tune import final_baseline

    # The final step's epochs and a baseline key the trials leave at its default (lr) count
    # as the chosen configuration has them.
    final = {"epochs": 5, "baseline": {"synthetic_ratio": 0, "lr": 0.002}}
    spec = parse_spec(study_spec(sample_with_test, tmp_path, labelled_with_test, final=final))
    context = StudyContext(spec, str(tmp_path), base_config(spec))
    trial = {"synthetic_ratio": 0.4, "epochs": 2, "batch_size": 4}
    assert final_baseline(context, {"config": trial})["synthetic_ratio"] == 0
    assert final_baseline(context, {"config": {**trial, "synthetic_ratio": 0.0}}) == {}
    assert final_baseline(context, {"config": {**trial, "synthetic_ratio": 0.0, "lr": 0.01}})
    lines = _baseline_lines({"chosen_is_baseline": True})
    assert "The search chose the baseline itself" in lines[-1]


def test_concurrent_trials_leave_ray_data_a_cpu_or_are_refused(sample_with_test, tmp_path, capsys):
    from defectforge.core.errors import ClusterError
    from defectforge.trainables.study_setup import study_worker_cpus, warn_of_missing_resources

    two = parse_spec(study_spec(sample_with_test, tmp_path, search={"max_concurrent_trials": 2}))
    assert study_worker_cpus(two) == 0.5  # 2 trials x 0.5 CPU on the 2-CPU session; 1 for data
    eight = parse_spec(study_spec(sample_with_test, tmp_path, search={"max_concurrent_trials": 8}))
    with pytest.raises(ClusterError, match="8 concurrent trial workers need at least 3 CPUs"):
        study_worker_cpus(eight)
    # A GPU trial keeps a CPU for Ray Data too: asking for every CPU would stall its reads.
    gpu = study_spec(sample_with_test, tmp_path, search={"max_concurrent_trials": 1})
    gpu["resources"] = {"cpus_per_trial": 2, "gpus_per_trial": 1}
    capsys.readouterr()
    assert study_worker_cpus(parse_spec(gpu)) == 1
    # The session has no GPU and no such label: trials asking for them would wait unsaid.
    warn_of_missing_resources(parse_spec(gpu))
    assert "asks for 1 GPU and the nodes of this Ray cluster have 0" in capsys.readouterr().err
    gpu["resources"] = {"custom_per_worker": {"defectforge_gpu_worker": 1}}
    warn_of_missing_resources(parse_spec(gpu))
    assert "1 defectforge_gpu_worker and the nodes" in capsys.readouterr().err
    warn_of_missing_resources(two)
    assert not capsys.readouterr().err


def _wait_for(condition, seconds: float, what: str, every: float = 1.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def _trial_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "search").glob("*_*") if p.is_dir())


def _tune_saved_trials(root: Path) -> int:
    """How many trials Tune's latest saved state of the search lists (none while Tune writes it)."""
    states = sorted((root / "search").glob("experiment_state-*.json"))
    try:
        return len(json.loads(states[-1].read_text())["trial_data"]) if states else 0
    except json.JSONDecodeError:
        return 0


def _saved_epochs(root: Path, epoch: int) -> int:
    """How many trials have saved ``epoch``'s folder complete (its metrics file is written last)."""
    return len(list((root / "train").glob(f"*/epoch_{epoch:03d}/epoch_metrics.json")))


def _run_driver_until(spec_file: Path, root: Path, log: Path, reached, what: str) -> None:
    """Start `study run` as its own driver on the session's Ray, and kill it as soon as
    ``reached()``: a driver lost mid-study. (Killed while Tune writes its state: the
    two-concurrent-trials test.)"""
    import ray

    env = {**os.environ, "RAY_AUTH_MODE": "token", "NO_ALBUMENTATIONS_UPDATE": "1"}
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "defectforge.cli", "study", "run", str(spec_file)]
    with log.open("w") as out:
        driver = subprocess.Popen(
            [*command, "--address", address],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=spec_file.parent,
        )
        try:
            # A driver that ends first (a refused spec) fails the wait at once, with its log.
            # Polled often: some kill points are a few milliseconds wide.
            _wait_for(lambda: reached() or driver.poll() is not None, 300, what, every=0.01)
            assert driver.poll() is None, log.read_text()[-3000:]
        finally:
            driver.kill()
            driver.wait()


def test_an_interrupted_study_resumes_reports_and_exports(
    sample_with_test, labelled_with_test, tmp_path, monkeypatch
):
    from defectforge.cli.study import study_line
    from defectforge.segmentation import export as export_module
    from defectforge.segmentation.checkpoint import load_model
    from defectforge.segmentation.export import verification_images
    from defectforge.segmentation.exported import ExportedModel
    from defectforge.segmentation.inference import predict_batch_logits
    from defectforge.studies.export import export_study
    from defectforge.studies.results import FINAL_FILE, TRIALS_FILE
    from defectforge.trainables.study import resume_study

    spec_file = tmp_path / "spec.yaml"
    # Its lr is no trial's, so it never equals the chosen configuration (which trains once).
    baseline = {"synthetic_ratio": 0.0, "lr": 0.001}
    spec = study_spec(
        sample_with_test, tmp_path, labelled_with_test, final={"epochs": 1, "baseline": baseline}
    )
    # Relative to the driver's folder, as users write them; trials run in folders of their own.
    for key, path in (("real", sample_with_test), ("synthetic", labelled_with_test)):
        spec["dataset"][key] = os.path.relpath(path, tmp_path)
    spec_file.write_text(yaml.safe_dump(spec))
    root = tmp_path / "t"
    test_split = sample_with_test / "test"
    hidden = sample_with_test.parent / "test-hidden"
    # The search must not need the test split at all: it is not even there while it runs.
    test_split.rename(hidden)
    try:
        # Killed as the second trial saves its last epoch, before Tune can hear of it.
        _run_driver_until(
            spec_file, root, tmp_path / "driver.log", lambda: _saved_epochs(root, 1) >= 2, "epoch 2"
        )
    finally:
        hidden.rename(test_split)
    first = _trial_dirs(root)[0]
    first_results = (first / "result.json").read_text()
    assert first_results.count("\n") == 2, (tmp_path / "driver.log").read_text()[-3000:]

    summary = resume_study(str(root))

    assert (first / "result.json").read_text() == first_results  # not rerun
    trials = json.loads((root / TRIALS_FILE).read_text())
    assert len(trials) == 2 and {t["status"] for t in trials} == {"finished"}
    assert sorted(t["config"]["synthetic_ratio"] for t in trials) == [0.0, 0.4]
    # The second trial's last epoch, saved before Tune heard of it, is Tune's result too.
    _tune_results_carry_the_trials_models(root)
    final = json.loads((root / FINAL_FILE).read_text())
    assert [s["seed"] for s in final["seeds"]] == [1000, 1001, 1002]
    interval = final["test_binary_defect_iou"]
    assert interval["n"] == 3 and interval["low"] <= interval["mean"] <= interval["high"]
    assert summary["final"] == final
    # The baseline ran the same seeds; the chosen configuration minus it, paired by seed.
    theirs = final["baseline"]
    assert [s["seed"] for s in theirs["seeds"]] == [1000, 1001, 1002]
    assert theirs["config"]["synthetic_ratio"] == 0.0 and theirs["config"]["lr"] == 0.001
    assert theirs["config"]["epochs"] == 1
    ours = {s["seed"]: s["test_binary_defect_iou"] for s in final["seeds"]}
    for row in final["paired"]["differences"]:
        base = next(s for s in theirs["seeds"] if s["seed"] == row["seed"])
        assert row["difference"] == pytest.approx(
            ours[row["seed"]] - base["test_binary_defect_iou"]
        )
    report = (root / "report" / "report.md").read_text()
    assert "Held-out test (3 seeds" in report and f"{interval['mean']:.4f}" in report
    assert "## Against the baseline (same seeds)" in report
    baseline_line = next(line for line in report.splitlines() if line.startswith("Baseline ("))
    assert "synthetic_ratio = 0.0000" in baseline_line and "synthetic_source" not in baseline_line
    assert study_line(summary).splitlines()[1].startswith("chosen vs baseline: ")
    for picture in ("iou_vs_ratio.png", "best_confusion.png", "best_per_class_iou.png"):
        assert (root / "report" / picture).stat().st_size > 5000

    out = tmp_path / "export"
    meta = export_study(str(root), out)
    assert meta["metrics"]["final_test_binary_defect_iou_interval"] == interval
    assert meta["data"]["real_manifest_id"] and meta["study"]["name"] == "t"
    chosen = max(final["seeds"], key=lambda s: s["best_val_binary_defect_iou"])
    model, cfg = load_model(chosen["best_checkpoint_path"])
    images = verification_images(cfg)
    reference = predict_batch_logits(model, cfg.batch_spec(), images).numpy()
    for runtime in ("onnx", "torchscript"):
        exported = ExportedModel(out, runtime).logits(images)
        assert np.abs(exported - reference).max() < 1e-3 * max(1.0, np.abs(reference).max())

    _predict_with_the_runtime_alone(out, tmp_path)

    # An export that does not match PyTorch is refused and leaves nothing behind.
    monkeypatch.setattr(export_module, "RELATIVE_TOLERANCE", 0.0)
    with pytest.raises(export_module.ExportMismatch, match="nothing was written"):
        export_study(str(root), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert not list(tmp_path.glob(".refused*"))


def test_an_optuna_study_with_asha_stops_trials_early_and_resumes_without_asking_again(
    sample_with_test, tmp_path, capsys
):
    """TPE and ASHA through `study run` with real trials; the driver killed while the fourth
    trial trains; `study resume` finishes the search from Optuna's own storage."""
    import optuna

    from defectforge.studies.results import TRIALS_FILE
    from defectforge.trainables.study import resume_study

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = study_spec(
        sample_with_test,
        tmp_path,
        search_space={
            "lr": {"low": 0.002, "high": 0.02, "log": True},
            "arch": ["unet", "fpn"],
            "epochs": 3,
            "batch_size": 8,
        },
        search={
            "algorithm": "optuna",
            "num_samples": 6,
            "seed": 0,
            # A trial below the 75th percentile of those before it at epoch 1 stops there:
            # with the soft-IoU tie-break, five trials in a row at the top is unlikely.
            "asha": {"grace_period": 1, "reduction_factor": 4},
            "optuna_storage": storage,
        },
        # Steps enough that trials differ after an epoch (the soft-IoU tie-break ranks the rest).
        training={**STUDY_TRAINING, "max_steps_per_epoch": 4, "crop_size": 64},
        final={"seeds": 0},
    )
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    root = tmp_path / "t"
    # After Tune saved the fourth trial: Tune then knows what finished, and no finished trial
    # is asked again.
    _run_driver_until(
        spec_file, root, tmp_path / "driver.log", lambda: _tune_saved_trials(root) >= 4, "trial 4"
    )
    (asked,) = optuna.get_all_study_names(storage)
    done = optuna.load_study(study_name=asked, storage=storage).get_trials(
        states=[optuna.trial.TrialState.COMPLETE]
    )
    log = (tmp_path / "driver.log").read_text()
    assert len(done) >= 2, log[-3000:]
    # One line per trial epoch, and none of Tune's status tables.
    epoch = r"^[0-9a-f_]+_arch=\w+,lr=[\d.]+: epoch 1/3: loss \d+\.\d{4}, val binary defect IoU"
    assert re.search(epoch + r" \d\.\d{4}$", log, re.MULTILINE), log[-3000:]
    assert "Trial status" not in log
    # As a driver killed between Optuna's ask and Tune's next snapshot leaves it: an ask that
    # Tune never recorded.
    distributions = {
        "arch": optuna.distributions.CategoricalDistribution(["unet", "fpn"]),
        "lr": optuna.distributions.FloatDistribution(0.002, 0.02, log=True),
    }
    lost = optuna.load_study(study_name=asked, storage=storage).ask(distributions).number

    resume_study(str(root))

    trials = json.loads((root / TRIALS_FILE).read_text())
    assert len(trials) == 6
    assert {t["status"] for t in trials} <= {"finished", "stopped early"}
    stopped = [t for t in trials if t["status"] == "stopped early"]
    assert stopped and all(t["epochs_run"] < 3 for t in stopped)
    # Optuna's storage kept what was told before the kill and no finished trial was asked
    # again; an ask the killed driver's Tune run never recorded is marked failed, not left
    # running for ever.
    after = optuna.load_study(study_name=asked, storage=storage).get_trials()
    states = optuna.trial.TrialState
    complete = [t for t in after if t.state == states.COMPLETE]
    orphans = [t for t in after if t.state != states.COMPLETE]
    assert len(complete) == 6 and {t.state for t in orphans} == {states.FAIL}
    assert lost in {t.number for t in orphans}
    kept = {t.number: t.params for t in after}
    assert all(kept[t.number] == t.params for t in done)
    report = (root / "report" / "report.md").read_text()
    assert "## Stopped early by ASHA" in report
    printed = log + capsys.readouterr().out
    assert re.search(r": stopped by the scheduler after epoch [12]/3; best val", printed)
    _tune_results_carry_the_trials_models(root)


def _tune_results_carry_the_trials_models(root: Path) -> None:
    """Ray's own ResultGrid of the search: each trial's checkpoint is the model of its latest
    epoch as the study kept it, and its best checkpoint scores what the study's best epoch did."""
    import torch

    from defectforge.segmentation.checkpoint import load_model
    from defectforge.studies.results import CHECKPOINT_SCORE, TRIALS_FILE
    from defectforge.trainables.study import search_results

    grid = search_results(str(root))
    trials = {t["trial"]: t for t in json.loads((root / TRIALS_FILE).read_text())}
    assert len(grid) == len(trials)
    for result in grid:
        name = Path(result.path).name
        with result.checkpoint.as_directory() as folder:
            theirs, _ = load_model(folder)
        latest = max((root / "train" / result.metrics["trial_id"]).glob("epoch_*"))
        ours, _ = load_model(latest)
        for key, weights in ours.state_dict().items():
            assert torch.equal(weights, theirs.state_dict()[key]), (name, key)
        best = result.get_best_checkpoint(CHECKPOINT_SCORE, "max")
        scored = next(m for c, m in result.best_checkpoints if c == best)
        assert scored[SELECTION_METRIC] == trials[name][SELECTION_METRIC]
    best = grid.get_best_result(SELECTION_METRIC, "max", scope="all")
    assert Path(best.path).name == max(trials.values(), key=lambda t: t[SELECTION_METRIC])["trial"]


# As on a machine with only `defectforge[cpu]` (and torch, for the TorchScript file).
BLOCK_IMPORTS = """
import sys
from defectforge.cli import TRAINING_MODULES
for name in TRAINING_MODULES:
    if not (name == "torch" and "torchscript" in sys.argv):
        sys.modules[name] = None  # importing it now fails
from defectforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _predict_with_the_runtime_alone(export: Path, tmp_path: Path) -> None:
    images = Path(__file__).resolve().parent.parent / "datasets/sample/neu-seg/images/val"
    out = tmp_path / "predicted"
    for runtime in ("onnx", "torchscript"):
        subprocess.run(
            [sys.executable, "-c", BLOCK_IMPORTS, "predict", "--model", str(export)]
            + ["--images", str(images), "--out", str(out / runtime), "--runtime", runtime]
            + ["--heatmaps"],
            check=True,
            capture_output=True,
            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
        )
    masks = sorted((out / "onnx").glob("*_mask.png"))
    assert len(masks) == 15 and len(list((out / "onnx").glob("*_heatmap.png"))) == 15
    differ = sum(
        np.count_nonzero(
            cv2.imread(str(m), -1) != cv2.imread(str(out / "torchscript" / m.name), -1)
        )
        for m in masks
    )
    # The two runtimes' logits differ by ~1e-5: a pixel whose two best classes tie that closely
    # may flip (1 of 600,000 was seen), nothing more.
    assert differ <= 10
    verdicts = [
        (out / runtime / "predictions.csv").read_text() for runtime in ("onnx", "torchscript")
    ]
    assert [line.split(",")[1] for line in verdicts[0].splitlines()] == [
        line.split(",")[1] for line in verdicts[1].splitlines()
    ]
    shutil.rmtree(out)


def test_study_specs_shipped_in_the_repo_parse():
    from defectforge.segmentation.config import SegConfig
    from defectforge.trainables.study_setup import _check_values

    specs = sorted((Path(__file__).resolve().parent.parent / "studies" / "specs").glob("*.yaml"))
    assert {p.stem for p in specs} >= {"quickstart", "search-neu-cpu", "search-steel-cpu"}
    base = SegConfig(data="d", classes=("background", "defect"), channels=3, mean=(0,), std=(1,))
    for path in specs:
        spec = parse_spec(yaml.safe_load(path.read_text()), str(path))
        _check_values(spec, base, str(path))  # every searched value makes a trial config
        assert spec.expected_runtime.get("cpu") and spec.expected_runtime.get("gpu")
        assert not any(isinstance(v, Range) for v in spec.searched().values()) or (
            spec.search.algorithm == "optuna"
        )


@pytest.mark.floors
def test_report_pools_seeds_per_configuration_with_an_interval(tmp_path):
    from defectforge.studies.report import write_report

    spec = parse_spec(
        {
            "name": "r",
            "dataset": {"real": "x", "synthetic": "y"},
            "search_space": {"synthetic_ratio": [0.0, 0.38], "seed": [0, 1, 2]},
            "search": {"algorithm": "grid", "asha": {"grace_period": 1}},
        }
    )
    scores = {0.0: [0.60, 0.62, 0.64], 0.38: [0.70, 0.71, 0.72]}
    classes = {"background": 0.9, "defect": 0.6}
    trials = [
        {
            "trial": f"a_{i}_{ratio}",
            "config": {"synthetic_ratio": ratio, "seed": seed},
            "status": "finished",
            "epochs_run": 2,
            "best_epoch": 2,
            SELECTION_METRIC: score,
            "val_mean_defect_iou": score,
            "val_per_class_iou": classes,
            "val_confusion_matrix": [[90, 10], [5, 20]],
            "checkpoint_path": None,
            "seconds": 10.0,
            "error": None,
        }
        for ratio, values in scores.items()
        for i, (seed, score) in enumerate(zip((0, 1, 2), values, strict=True))
    ]
    # ASHA stopped the weakest real-only seed after its first epoch.
    trials[0].update(status="stopped early", epochs_run=1, trial="d88ad85c_ratio=0")
    trials.sort(key=lambda t: -t[SELECTION_METRIC])
    study = {
        "name": "r",
        "dataset_ids": {"real": "abc", "synthetic": "def"},
        "spec": {"dataset": {"real": "/data/real", "synthetic": "/data/labelled"}},
        "spec_sha256": "0" * 64,
        "created": "now",
    }
    summary = write_report(tmp_path, spec, study, trials, None)
    text = (tmp_path / "report.md").read_text()
    assert (
        "- data: `/data/real` (id `abc`), GAN images labelled `/data/labelled` (id `def`)" in text
    )
    # mean 0.71, sd 0.01, t(0.975, 2) = 4.3027: 0.71 -/+ 0.0248
    assert "| 0.3800 | 3 | 0.7100 | 0.6852 - 0.7348 |" in text
    assert "| 0.0000 | 3 | 0.6200 | 0.5703 - 0.6697 |" in text
    assert summary["best"][SELECTION_METRIC] == 0.72 and summary["importance"] == {
        "synthetic_ratio": 1.0
    }
    assert (tmp_path / "iou_vs_ratio.png").stat().st_size > 5000
    for view in ("optimization_history.png", "parallel_coordinate.png"):
        assert f"![{view}]({view})" in text and (tmp_path / view).stat().st_size > 5000
    assert "## Stopped early by ASHA (1 of 6 trials)" in text
    assert "| `d88ad85c_ratio=0` | 1 | 0.6000 |" in text


def test_trial_slots_hold_trials_to_the_limit_and_free_dead_ones(ray_session):
    import ray

    from defectforge.trainables.slots import TrialSlots, trial_slot

    @ray.remote(num_cpus=0)
    def hold(slots, holder: str) -> tuple[float, float]:
        with trial_slot(slots, holder, poll_seconds=0.05):
            started = time.time()
            time.sleep(0.5)
            return started, time.time()

    slots = TrialSlots.remote(1)
    spans = sorted(ray.get([hold.remote(slots, f"trial-{i}") for i in range(3)]))
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:], strict=False))
    assert ray.get(slots.holders.remote()) == []

    short = TrialSlots.remote(1, lease_seconds=0.5)
    assert ray.get(short.acquire.remote("crashed"))  # never released: its process died
    assert not ray.get(short.acquire.remote("next"))
    assert ray.get(short.acquire.remote("crashed"))  # a restarted trial keeps its slot
    time.sleep(0.6)
    assert ray.get(short.acquire.remote("next"))


def test_a_failed_trials_error_is_its_exceptions_line_not_rays_actor_line():
    from defectforge.studies.results import error_line

    traceback = (
        "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, ip=192.0.2.2, repr=search_trial)\n"
        '  File "trainables/seg_feed.py", line 165, in check_batch_fits\n'
        "    raise ConfigError(\n"
        "defectforge.core.errors.ConfigError: batch_size = 64: fewer than one batch\n\n"
    )
    assert error_line(traceback) == "ConfigError: batch_size = 64: fewer than one batch"


def test_a_study_whose_trials_all_failed_reports_and_refuses_export_in_one_line(tmp_path):
    import json

    from defectforge.cli.study import study_line
    from defectforge.core.errors import DataError
    from defectforge.segmentation.selection import SELECTION_METRIC
    from defectforge.studies.export import export_study

    failed = {"trial": "t0", "status": "error", SELECTION_METRIC: None, "error": "ConfigError: x"}
    (tmp_path / "study.json").write_text(json.dumps({"name": "t"}))
    (tmp_path / "trials.json").write_text(json.dumps([failed]))
    with pytest.raises(DataError, match="none of its 1 trials has a validation score"):
        export_study(str(tmp_path), tmp_path / "export")
    assert not (tmp_path / "export").exists()
    assert study_line({"best": None, "final": None}).startswith("no trial has a validation score")

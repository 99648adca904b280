"""The whole method as one resumable study (issue 17): stages keyed by what they are made from,
reused when made, continued when interrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from s3server import credentials

from defectforge.core.storage import Location
from defectforge.studies.errors import SpecError
from defectforge.studies.spec import parse_spec
from defectforge.studies.stages import stage_key


def test_stage_keys_change_when_and_only_when_their_inputs_change():
    gan = {"profile": "cpu-small", "resolution": 32, "kimg": 0.1}
    base = stage_key("gan", gan, {"data": "abc"})
    assert stage_key("gan", dict(reversed(list(gan.items()))), {"data": "abc"}) == base
    assert stage_key("gan", {**gan, "kimg": 0.2}, {"data": "abc"}) != base
    assert stage_key("gan", gan, {"data": "abd"}) != base
    assert stage_key("labeller", gan, {"data": "abc"}) != base


@pytest.mark.parametrize(
    "stages, message",
    [
        ({"label": {}, "labeller": {"run": "x"}}, "label = {}: needs a generate section"),
        ({"generate": {"count": 8}}, "generate = .*: needs a gan section"),
        ({"labeller": {"run": "x", "epochs": 2}}, "give either run: PATH .* or the options"),
        ({"gan": {"profile": "huge"}}, "gan.profile = 'huge': must be one of cpu-small, gpu"),
        ({"gan": {"kimg": -1}}, "gan.kimg = -1.0: must be > 0"),
        ({"labeller": {"lr": 0}}, "labeller.lr = 0.0: must be > 0"),
        ({"generate": {"count": 0}, "gan": {"run": "g"}}, "generate: count = 0: must be >= 1"),
        ({"data": {"source": "neu-seg"}}, "data: root = None: missing"),
        ({"export": {"target_recall": 2}}, "export: target_recall = 2.0: must be in"),
        (
            {"data": {"source": "steel", "root": "r", "test_fraction": 0.1}},
            "test_fraction = 0.1 is not used with source steel .*split_ratios.*; remove it",
        ),
        ({"mask_gan": {"masks": False}}, "mask_gan.masks = False: not a mask_gan option"),
        (  # set by the pipeline from the data stage, so neither allowed nor listed
            {"gan": {"data_manifest_id": "x"}},
            r"not a gan option; use one of \[(?!.*data_manifest_id).*'workers'",
        ),
        ({"generate_masks": {"count": 8}}, "generate_masks = .*: needs a mask_gan section"),
        ({"mask_gan": {"run": "g"}}, "mask_gan = .*: nothing uses it: only a generate_masks"),
        ({"gan": {"run": "g"}}, "gan = .*: nothing uses it: only a generate stage.*remove gan"),
        ({"labeller": {"epochs": 2}}, "labeller = .*: nothing uses it: only a label stage"),
    ],
)
def test_stage_sections_are_checked_when_the_spec_loads(stages, message):
    spec = {"name": "p", "dataset": {"real": "x"}, "search_space": {"epochs": 1}, **stages}
    with pytest.raises(SpecError, match=message):
        parse_spec(spec, "p.yaml")


def test_study_check_finds_the_data_stages_raw_images_before_any_stage(sample_root, tmp_path):
    """A wrong root or layout is one line from `study check`, naming the spec key and the
    folder; it said "fine" and `study run` failed at its first stage."""
    from defectforge.trainables.study_setup import check_raw_images

    spec = {"name": "p", "search_space": {"epochs": 1}}
    neu = {"data": {"source": "neu-seg", "root": str(sample_root)}}
    check_raw_images(parse_spec({**spec, **neu}), "p.yaml")
    (tmp_path / "empty").mkdir()
    for source, root in (("neu-seg", tmp_path / "missing"), ("folder", tmp_path / "empty")):
        stage = {"data": {"source": source, "root": str(root)}}
        with pytest.raises(SpecError) as refused:
            check_raw_images(parse_spec({**spec, **stage}, "p.yaml"), "p.yaml")
        message = str(refused.value)
        assert message.startswith(f"p.yaml: data.root = '{root}': {root}") and "\n" not in message


def test_an_empty_spec_says_so():
    with pytest.raises(SpecError, match=r"^p.yaml: the spec is empty; write one"):
        parse_spec(None, "p.yaml")


def test_a_jobs_progress_is_read_from_its_log():
    from defectforge.cluster.jobs import job_progress

    log = (
        "[stage 2/5] labeller 1a2b: done in 70 s\n[stage 3/5] gan 3c4d: running\n"
        "gan:  25%|##5       | 0.032/0.128 [00:20<01:00, 0.0016kimg/s, SWD 210.0]\r"
        "gan:  50%|#####     | 0.064/0.128 [00:40<00:40, 0.0016kimg/s, SWD 205.1]\r"
    )
    assert job_progress(log) == "[stage 3/5] gan 3c4d: running; gan 0.064/0.128"
    assert job_progress("nothing yet") == ""
    log += (
        "\n[stage 5/5] label 5e6f: done in 30 s\n"
        "9f1a6_00000_ratio=0.2: epoch 1/2: loss 0.5120, val binary defect IoU 0.4100\n"
        "9f1a6_00001_ratio=0.4: epoch 2/2: loss 0.4810, val binary defect IoU 0.4400\n"
    )
    assert job_progress(log) == (
        "[stage 5/5] label 5e6f: done in 30 s; gan 0.064/0.128; trial 9f1a6_00001_ratio=0.4 "
        "epoch 2/2"
    )


def pipeline_spec(sample_root: Path, labeller: Path, storage: Path | str) -> dict:
    """A tiny pipeline: the sample built, a given labeller, a GAN of a few snapshots, generated
    and labelled images, one trial with them, an export."""
    return {
        "name": "pipe",
        "data": {"source": "neu-seg", "root": str(sample_root), "test_fraction": 0.4},
        "labeller": {"run": str(labeller)},
        "gan": {"resolution": 32, "kimg": 0.064, "snapshot_kimg": 0.032, "metric_images": 16},
        "generate": {"count": 24},
        "label": {"min_confidence": 0.0},
        "search_space": {"synthetic_ratio": 0.2, "epochs": 1, "batch_size": 4},
        "training": {"crop_size": 64, "max_steps_per_epoch": 2},
        "search": {"algorithm": "grid"},
        "storage_path": str(storage),
        "final": {"seeds": 0},
        "export": {},
    }


def _gan_snapshots(storage: Location) -> list[str]:
    """The GAN stage's Ray Train checkpoints on the store."""
    stages = storage / "stages"
    runs = [stages / name / "ray" for name in stages.subfolders() if name.startswith("gan-")]
    return [
        name
        for ray_folder in runs
        for trainer in ray_folder.subfolders()
        for name in (ray_folder / trainer).subfolders()
        if name.startswith("kimg_")
    ]


def test_a_pipeline_study_on_a_store_resumes_inside_its_gan_stage_and_reuses_what_it_made(
    ray_session, s3_server, mlflow_server, sample_root, labeller_with_test, tmp_path
):
    """Every stage, trial and report on a bucket; the driver killed mid-GAN; `study resume`
    continues the GAN from its snapshot on the bucket and makes nothing twice; the trial and
    the study are tracked on an MLflow server."""
    import ray

    from defectforge.trainables.pipeline import Pipeline
    from defectforge.trainables.study import resume_study

    storage = Location.of(s3_server.make_bucket("pipelines")) / "studies"
    spec_file = tmp_path / "spec.yaml"
    # The labeller learnt from the train split of the data stage's very build (--test-fraction
    # 0.4): one trained on the whole sample would leak into its test split, and be refused.
    spec = pipeline_spec(sample_root, labeller_with_test, storage.uri)
    spec["tracking"] = {"mlflow": mlflow_server.url}
    spec["training"]["image_size"] = 64  # the trial's validation pass at a tenth of the cost
    spec_file.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "defectforge.cli", "study", "run", str(spec_file)]
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        try:  # killed once the GAN has a snapshot past kimg 0: a driver lost mid-GAN
            while len(_gan_snapshots(storage)) < 2:
                assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[
                    -3000:
                ]
                time.sleep(0.5)
        finally:
            driver.kill()
            driver.wait()
    stages = storage / "stages"
    gan_folder = stages / next(n for n in stages.subfolders() if n.startswith("gan-"))
    assert not (gan_folder / "stage.json").exists()  # stopped inside the stage

    summary = resume_study((storage / "pipe").uri)

    study = (storage / "pipe" / "study.json").read_json()
    statuses = {stage["name"]: stage["status"] for stage in study["stages"]}
    assert statuses == {
        "data": "reused",
        "labeller": "given",
        "gan": "ran",
        "generate": "ran",
        "label": "ran",
    }
    history = (gan_folder / "metrics.json").read_json()["history"]
    kimgs = [round(row["kimg"], 3) for row in history]
    assert kimgs == sorted(set(kimgs)) and kimgs[0] == 0.0 and kimgs[-1] >= 0.064
    assert len((gan_folder / "ray").subfolders()) == 1  # continued in its own run, not restarted
    assert (storage / "pipe" / "export" / "model.onnx").is_file()
    assert summary["export"] == (storage / "pipe" / "export").uri
    report = (storage / "pipe" / "report" / "report.md").read_text()
    assert "## Stages" in report and "| gan |" in report
    _tracked_in_mlflow(mlflow_server.url, summary)
    # Ray Tune copies the driver's AWS variables into each trial actor's runtime env, which
    # Ray's runtime-env agent logs: the secret stays out of every log of the session.
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    secret = credentials()[1]
    assert not [log.name for log in logs.rglob("*") if log.is_file() and secret in _text(log)]

    # The same stages asked for again (by this or any study under this storage) are reused.
    again = Pipeline(
        parse_spec(yaml.safe_load(spec_file.read_text()), str(spec_file)), str(spec_file)
    )
    again.run()
    assert {run.status for run in again.runs} == {"reused", "given"}


def _text(path: Path) -> str:
    return path.read_bytes().decode(errors="replace")


def _tracked_in_mlflow(url: str, summary: dict) -> None:
    """The trial's run holds its values and its epoch's metrics; the study's run the chosen
    values, the report and the export."""
    import mlflow

    from defectforge.trainables.tracking import STUDY_TAG, TUNE_RUN_TAG

    client = mlflow.MlflowClient(url)
    experiment = client.get_experiment_by_name("pipe").experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`{STUDY_TAG}` = 'pipe'")
    trials = [run for run in runs if run.data.tags.get(TUNE_RUN_TAG) == "search"]
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"
    (trial,) = trials
    assert trial.data.params["synthetic_ratio"] == "0.2"
    history = client.get_metric_history(trial.info.run_id, "val_binary_defect_iou")
    assert [point.step for point in history] == [1]
    (study,) = [run for run in runs if run.info.run_id == summary["mlflow_run"]]
    assert study.data.params["synthetic_ratio"] == "0.2"
    assert "best_val_binary_defect_iou" in study.data.metrics
    listed = {item.path for item in client.list_artifacts(study.info.run_id, "export")}
    assert "export/model.onnx" in listed and "export/model.json" in listed
    report = {item.path for item in client.list_artifacts(study.info.run_id, "report")}
    assert "report/report.md" in report


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"generate": {"count": 2}, "search_space": {"synthetic_ratio": [0.0, 0.38]}},
            r"generate.count = 2: ratio 0.38 over \d+ real train",
        ),
        (  # GAN and copy-paste images together: each set gives as many as the smaller one
            {
                "copy_paste": {"count": 3},
                "combine": {"sources": ["gan", "copy_paste"]},
                "search_space": {"synthetic_ratio": 0.38, "synthetic_source": "combined"},
            },
            r"copy_paste.count = 3: ratio 0.38 over \d+ real train images needs \d+ combined "
            r"images with masks, and the stages make at most 6; lower the largest ratio or raise "
            r"copy_paste.count \(now 3\): each combined set gives as many as the smallest "
            r"\(generate.count = \d+, copy_paste.count = 3\), and \d+ of each are needed; "
            r"samples without a defect are not kept",
        ),
        (  # a searched value no trial could train with (PAN at 64-px crops)
            {"search_space": {"arch": ["unet", "pan"], "epochs": 1}},
            r"search_space.arch = 'pan': crop_size = 64: pan needs inputs of at least 128 px",
        ),
    ],
)
def test_what_would_fail_later_is_refused_before_the_gan_trains(
    ray_session, sample_root, tmp_path, changes, message
):
    from defectforge.trainables.pipeline import Pipeline

    spec = pipeline_spec(sample_root, tmp_path / "no-labeller-needed", tmp_path / "storage")
    for section, values in changes.items():
        spec[section] = {**spec.get(section, {}), **values}

    with pytest.raises(SpecError, match=message):
        Pipeline(parse_spec(spec, "spec.yaml"), "spec.yaml").run()
    made = sorted(p.name.split("-")[0] for p in (tmp_path / "storage" / "stages").iterdir())
    assert made == ["data"]  # neither the labeller nor the GAN stage started


def test_a_given_run_that_is_none_is_refused_before_anything_trains(
    ray_session, sample_root, tmp_path
):
    from defectforge.trainables.pipeline import Pipeline

    spec = pipeline_spec(sample_root, tmp_path / "nope", tmp_path / "storage")
    with pytest.raises(SpecError, match=r"labeller.run = .*nope.*holds no model.pt"):
        Pipeline(parse_spec(spec, "spec.yaml"), "spec.yaml").run()
    made = sorted(p.name.split("-")[0] for p in (tmp_path / "storage" / "stages").iterdir())
    assert made == ["data"]


def test_a_study_stopped_by_its_checks_takes_the_corrected_spec(
    ray_session, sample_root, tmp_path, capsys
):
    import ray

    from defectforge.core.errors import DataError
    from defectforge.trainables.study import run_study

    storage, spec_file = tmp_path / "storage", tmp_path / "spec.yaml"
    spec = pipeline_spec(sample_root, tmp_path / "no-labeller-needed", storage)
    spec["search_space"]["synthetic_ratio"] = [0.0, 0.38]
    address = ray.get_runtime_context().gcs_address
    for count in (2, 3):  # the second spec is "corrected", yet still too small: refused again
        spec["generate"] = {"count": count}
        spec_file.write_text(yaml.safe_dump(spec))
        with pytest.raises(SpecError, match=f"generate.count = {count}:"):
            run_study(spec_file, address=address)

    assert "was refused before its search; starting it from this spec" in capsys.readouterr().out
    recorded = json.loads((storage / "pipe" / "study.json").read_text())
    assert recorded["spec"]["stages"]["generate"]["count"] == 3

    # Stopped while running (no refusal recorded), it keeps its spec.
    del recorded["refused_before_search"]
    (storage / "pipe" / "study.json").write_text(json.dumps(recorded))
    spec["generate"] = {"count": 4}
    spec_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(DataError, match="a study of this name exists, made from another spec"):
        run_study(spec_file, address=address)


def test_too_few_kept_samples_name_the_count_to_raise():
    sections = {"mask_gan": {"run": "g"}, "generate_masks": {"count": 1000}}
    stages = parse_spec(
        {"name": "p", "dataset": {"real": "x"}, "search_space": {"epochs": 1}, **sections},
        "p.yaml",
    ).stages
    assert stages.more_images_fix("gan_masks").endswith(
        "raise generate_masks.count (now 1000); samples without a defect are not kept"
    )
    assert stages.more_images_fix("gan_masks", 1200).endswith(
        "raise generate_masks.count (now 1000) to at least 1200; samples without a defect are "
        "not kept"
    )
    assert stages.more_images_fix("gan").endswith("give a synthetic set with more images")

    sections = {**sections, "copy_paste": {"count": 50}}
    space = {"epochs": 1, "synthetic_source": "combined", "synthetic_ratio": 0.3}

    def parsed(combine):
        spec = {"name": "p", "dataset": {"real": "x"}, "search_space": space, **sections}
        return parse_spec({**spec, "combine": combine}, "p.yaml").stages

    combined = {"sources": ["gan_masks", "copy_paste"]}
    stages = parsed({**combined, "count_each": 40})
    assert stages.more_images_fix("copy_paste").endswith("raise copy_paste.count (now 50)")
    assert stages.more_images_fix("combined", 90).endswith(
        "raise combine.count_each (now 40): each combined set gives as many as the smallest "
        "(generate_masks.count = 1000, copy_paste.count = 50), and 45 of each are needed; "
        "samples without a defect are not kept"
    )
    assert stages.most_made("combined") == ("combine.count_each", 40, 80)
    # Unset, count_each bounds nothing: the smallest part does, and it is the count to raise.
    stages = parsed(combined)
    assert stages.most_made("combined") == ("copy_paste.count", 50, 100)
    assert "raise copy_paste.count (now 50):" in stages.more_images_fix("combined")
    # More of each set than its stage makes could never be combined: refused when parsed.
    with pytest.raises(SpecError, match=r"combine.count_each = 60: .* copy_paste.count = 50 "):
        parsed({**combined, "count_each": 60})

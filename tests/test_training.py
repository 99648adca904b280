"""The training loop without Ray (exact resume), in one Ray task (1 worker) and through Ray Train
(2 workers), plus the CLI."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from cli_checks import error_lines

from defectforge.cli import main
from defectforge.core.errors import DataError
from defectforge.datasets.batches import BatchMaker
from defectforge.datasets.contract import split_dir
from defectforge.datasets.manifest import Manifest
from defectforge.segmentation.checkpoint import load_model
from defectforge.segmentation.config import SegConfig
from defectforge.segmentation.loop import LoopIO, train_segmentation

TINY = dict(
    arch="unet",
    encoder="resnet18",
    crop_size=64,
    batch_size=4,
    epochs=2,
    max_steps_per_epoch=3,
    aug_strength=1.0,
    threads=1,
)


def _config(dataset: Path, **overrides) -> SegConfig:
    manifest = Manifest.load(dataset)
    return SegConfig(
        data=str(dataset),
        classes=manifest.classes,
        channels=manifest.channels,
        mean=manifest.pixel_mean,
        std=manifest.pixel_std,
        **{**TINY, **overrides},
    )


def _plain_io(cfg: SegConfig, checkpoints: list, resume_from=None) -> LoopIO:
    rows = pq.read_table(split_dir(cfg.data, "train"), columns=["image", "mask"]).to_pylist()
    rows.sort(key=lambda r: r["image"])
    val_rows = pq.read_table(split_dir(cfg.data, "val"), columns=["image", "mask"]).to_pylist()[:4]
    maker, val_maker = (
        BatchMaker(cfg.batch_spec(), True, cfg.seed),
        BatchMaker(cfg.batch_spec(), False),
    )

    def batches(source, make, size):
        for start in range(0, len(source) - size + 1, size):
            chunk = source[start : start + size]
            yield make({"image": [r["image"] for r in chunk], "mask": [r["mask"] for r in chunk]})

    def record(metrics, folder):
        state = torch.load(Path(folder) / "state.pt", weights_only=False)
        state["model"] = torch.load(Path(folder) / "model.pt", weights_only=True)
        checkpoints.append((metrics, state))
        target = Path(folder).parent / f"kept-{metrics['epoch']}"
        if not target.exists():
            import shutil

            shutil.copytree(folder, target)

    return LoopIO(
        train_batches=lambda epoch: batches(rows, maker, cfg.batch_size),
        val_batches=lambda: batches(val_rows, val_maker, 2),
        steps_per_epoch=cfg.max_steps_per_epoch,
        report=record,
        resume_from=resume_from,
        on_epoch_start=maker.set_epoch,
    )


def test_resume_reproduces_the_uninterrupted_run(sample_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    cfg = _config(sample_dataset)
    straight: list = []
    train_segmentation(cfg, _plain_io(cfg, straight))
    kept = tmp_path / "kept-0"
    resumed: list = []
    train_segmentation(cfg, _plain_io(cfg, resumed, resume_from=kept))
    assert [m["epoch"] for m, _ in resumed] == [1]
    final_straight, final_resumed = straight[-1][1]["model"], resumed[-1][1]["model"]
    for key in final_straight:
        assert torch.equal(final_straight[key], final_resumed[key]), key
    assert straight[-1][0]["train_loss"] == resumed[-1][0]["train_loss"]


def _in_memory_run(cfg: SegConfig, checkpoints: list, resume_from=None) -> None:
    """``cfg`` trained through the Ray Data feed read into memory (a one-worker trial's feed)."""
    from defectforge.trainables.data_jobs import read_split, train_rows
    from defectforge.trainables.seg_feed import seg_loop_io

    def record(metrics, folder):
        checkpoints.append(torch.load(Path(folder) / "model.pt", weights_only=True))
        target = Path(folder).parent / f"kept-{metrics['epoch']}"
        if not target.exists():
            import shutil

            shutil.copytree(folder, target)

    train = train_rows(cfg.data)
    io = seg_loop_io(
        cfg,
        train,
        read_split(cfg.data, "val"),
        train.count(),
        record,
        in_memory=True,
        resume_from=resume_from,
    )
    train_segmentation(cfg, io)


def test_a_resume_from_memory_replays_the_uninterrupted_runs_batches(
    sample_dataset, tmp_path, monkeypatch
):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    cfg = _config(sample_dataset)
    straight: list = []
    _in_memory_run(cfg, straight)
    resumed: list = []
    _in_memory_run(cfg, resumed, resume_from=tmp_path / "kept-0")

    assert len(straight) == 2 and len(resumed) == 1
    for key in straight[-1]:
        assert torch.equal(straight[-1][key], resumed[-1][key]), key


def test_config_rejects_typos_and_bad_values(sample_dataset):
    with pytest.raises(ValueError, match="unknown segmentation config keys"):
        SegConfig.from_dict({**json.loads(_config(sample_dataset).to_json()), "lr_rate": 1})
    with pytest.raises(ValueError, match="multiple of 32"):
        _config(sample_dataset, crop_size=100)
    with pytest.raises(ValueError, match="at least 128 px"):
        _config(sample_dataset, arch="pan", crop_size=64)
    with pytest.raises(ValueError, match="unknown architecture"):
        _config(sample_dataset, arch="segnet")


@pytest.mark.floors
def test_one_worker_trains_in_a_task_keeps_best_and_latest_and_continues(
    sample_dataset, tmp_path, ray_session, mlflow_server
):
    """... and is one MLflow run across the resume: config, every epoch, model and plots."""
    from mlflowserver import artifact_names, only_run

    from defectforge.segmentation.checkpoint import MODEL_FILE
    from defectforge.studies.spec_schema import TrackingSpec
    from defectforge.trainables.seg import run_result, run_seg_training

    tracking = TrackingSpec(mlflow=mlflow_server.url, experiment="one-worker")
    cfg = _config(sample_dataset, epochs=3, max_steps_per_epoch=2)
    run = tmp_path / "run"
    summary = run_seg_training(cfg, run, tracking=tracking)
    assert [row["epoch"] for row in summary["history"]] == [0, 1, 2]
    storage = run / "ray"
    assert [p.name for p in storage.iterdir()] == ["one-worker"]  # no Ray Train run
    kept = sorted(p.name for p in (storage / "one-worker").iterdir())
    best = f"epoch_{summary['best']['epoch']:03d}"
    assert kept == sorted({best, "epoch_002"})
    assert load_model(run)[1] == cfg
    assert len((run / "progress.jsonl").read_text().splitlines()) == 3

    again = run_seg_training(cfg, run)  # the same command again: nothing left to train
    assert again["history"] == summary["history"]
    with pytest.raises(DataError, match="already has all 3 epochs"):
        run_seg_training(cfg, run, resume=True)
    more = run_seg_training(replace(cfg, epochs=4), run, resume=True, tracking=tracking)
    assert [row["epoch"] for row in more["history"]] == [0, 1, 2, 3]
    assert more["history"][:3] == summary["history"]
    assert "epoch_003" in {p.name for p in (storage / "one-worker").iterdir()}

    # As Ray Train's own Result: the latest epoch, the kept ones with their metrics.
    result = run_result(run)
    assert Path(result.checkpoint.path).name == "epoch_003" and result.metrics["epoch"] == 3
    assert load_model(result.checkpoint.path)[1] == replace(cfg, epochs=4)
    kept = {metrics["epoch"]: checkpoint for checkpoint, metrics in result.best_checkpoints}
    assert set(kept) == {more["best"]["epoch"], 3}
    published, best = load_model(run)[0], load_model(kept[more["best"]["epoch"]].path)[0]
    assert all(
        torch.equal(a, b)
        for a, b in zip(published.state_dict().values(), best.state_dict().values(), strict=True)
    )
    assert list(result.metrics_dataframe["epoch"]) == [0, 1, 2, 3]

    client, tracked = only_run(mlflow_server.url, "one-worker")
    assert tracked.info.status == "FINISHED" and tracked.data.params["epochs"] == "3"
    history = client.get_metric_history(tracked.info.run_id, "val_binary_defect_iou")
    assert sorted(point.step for point in history) == [0, 1, 2, 3]
    assert {point.step: point.value for point in history} == {
        row["epoch"]: row["val_binary_defect_iou"] for row in more["history"]
    }
    assert {MODEL_FILE, "metrics.json", "plots"} <= artifact_names(client, tracked.info.run_id)
    assert "plots/validation_grid.png" in artifact_names(client, tracked.info.run_id, "plots")


def test_two_worker_ray_train_then_eval_and_predict_cli(
    sample_dataset, sample_root, tmp_path, capsys
):
    from defectforge.trainables.seg import run_result, run_seg_training

    cfg = _config(
        sample_dataset, workers=2, epochs=2, max_steps_per_epoch=2, arch="pan", crop_size=128
    )
    run = tmp_path / "run"
    # --resume continues from the newest checkpoint of either kind: two workers after a
    # one-worker run, then one worker again (from the Train run's latest epoch, not from its
    # own older one).
    one = run_seg_training(replace(cfg, workers=1), run)
    assert [row["epoch"] for row in one["history"]] == [0, 1]
    with pytest.raises(DataError, match="already has all 2 epochs"):
        run_seg_training(replace(cfg, workers=1), run, resume=True)
    # Two workers on 2 CPUs: each gets half, Ray Data keeps one.
    two = run_seg_training(replace(cfg, epochs=3), run, resume=True)
    assert [row["epoch"] for row in two["history"]] == [0, 1, 2]
    assert two["history"][:2] == one["history"]
    assert (run / "model.pt").is_file() and (run / "config.json").is_file()
    model, loaded = load_model(run)
    assert loaded == replace(cfg, epochs=3)
    trained = run_result(run)  # the Ray Train run's own Result, read back from its folder
    assert Path(trained.checkpoint.path).name == "epoch_002"
    assert load_model(trained.checkpoint.path)[1] == replace(cfg, epochs=3)
    last = run_seg_training(replace(cfg, epochs=4, workers=1), run, resume=True)
    assert [row["epoch"] for row in last["history"]] == [0, 1, 2, 3]
    assert last["history"][:3] == two["history"]

    capsys.readouterr()
    code = main(
        [
            "seg",
            "eval",
            "--model",
            str(run),
            "--images",
            str(sample_root / "images" / "val"),
            "--masks",
            str(sample_root / "masks" / "val"),
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    for key in (
        "binary_defect_iou",
        "per_class_iou",
        "mean_defect_iou",
        "pixel_accuracy",
        "confusion_matrix",
    ):
        assert key in result
    assert np.asarray(result["confusion_matrix"]).sum() == 15 * 200 * 200

    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--model",
                str(run),
                "--images",
                str(sample_root / "images" / "val"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert len(list(out.glob("*_mask.png"))) == 15 and len(list(out.glob("*_overlay.png"))) == 15


def test_binary_model_evaluates_multiclass_masks(sample_dataset, sample_root, tmp_path):
    from defectforge.segmentation.checkpoint import save_model
    from defectforge.segmentation.inference import evaluate_folder
    from defectforge.segmentation.models import build_model

    cfg = _config(sample_dataset, binary=True)
    run = save_model(tmp_path / "binary", build_model("unet", "resnet18", 1, 2), cfg)
    result = evaluate_folder(run, sample_root / "images" / "val", sample_root / "masks" / "val")
    assert result["class_names"] == ["background", "defect"]
    assert np.asarray(result["confusion_matrix"]).sum() == 15 * 200 * 200


def test_eval_of_a_missing_model_is_one_line(tmp_path, capsys):
    code = main(
        [
            "seg",
            "eval",
            "--model",
            str(tmp_path),
            "--images",
            str(tmp_path),
            "--masks",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(error_lines(err)) == 1 and "config.json" in err


def test_the_result_of_a_folder_without_a_run_is_one_line(tmp_path):
    from defectforge.trainables.seg import run_result

    with pytest.raises(DataError, match="no epoch checkpoint here.*`seg train` run"):
        run_result(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_runs_bar_counts_its_rate_from_where_it_resumed(tmp_path):
    import time

    from defectforge.trainables.progress import PROGRESS_FILE, ProgressBar

    progress = tmp_path / PROGRESS_FILE
    # Stopped at kimg 46.5, its latest snapshot at 44: the continued run starts from 44.
    progress.write_text("".join(json.dumps({"kimg": k}) + "\n" for k in (4.0, 44.0, 46.5)))
    bar = ProgressBar(tmp_path, 100, "kimg", lambda r: r["kimg"], lambda r: "")
    time.sleep(0.2)
    with open(progress, "a") as handle:
        handle.write("".join(json.dumps({"kimg": k}) + "\n" for k in (44.1, 44.5)))
    bar.poll()
    shown = bar.bar.format_dict
    bar.close()
    assert shown["n"] == 44.5 and shown["initial"] == 44.1
    # 0.4 kimg in this command's time, not the 44.5 of the run (which would read 100x faster)
    assert shown["elapsed"] > 0.2 and (shown["n"] - shown["initial"]) / shown["elapsed"] < 2.5

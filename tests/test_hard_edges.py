"""Hard edges a user hit on the command line (issue 28): each refused in one line (exit 2, no
traceback) before anything starts, with nothing lost or left looking finished."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cli_checks import error_lines, refused, snapshot

from defectforge.cli import main
from defectforge.cluster import jobs, local
from defectforge.core.errors import ClusterError, ConfigError, DataError
from defectforge.core.files import write_json_atomic
from defectforge.core.outputs import (
    GAN_RUN,
    OUTPUT_RECORD,
    SEG_RUN,
    STAGING,
    new_staging,
    output_record,
    prepare_run_folder,
)

CLI = [sys.executable, "-m", "defectforge.cli"]


def build_argv(root: Path, out: Path, *flags: str) -> list[str]:
    return ["data", "build", "--source", "neu-seg", "--root", str(root), "--out", str(out), *flags]


# --- 1. a run folder takes only a run of its own kind ------------------------------------------


@pytest.fixture
def runs(tmp_path) -> dict[str, Path]:
    """A segmentation run and a GAN run as training leaves them, an earlier version's GAN run
    (weights, no record) and a dataset."""
    seg = prepare_run_folder(tmp_path / "seg-run", SEG_RUN)
    gan = prepare_run_folder(tmp_path / "gan-run", GAN_RUN)
    earlier = tmp_path / "earlier-gan"
    earlier.mkdir()
    for folder, weights in ((seg, "model.pt"), (gan, "generator.pt"), (earlier, "generator.pt")):
        (folder / weights).write_bytes(b"hours of training")
        (folder / "config.json").write_text('{"trained": true}')
        (folder / "metrics.json").write_text('{"best": 0.7}')
    dataset = tmp_path / "dataset"  # any other output, here a dataset
    dataset.mkdir()
    write_json_atomic(dataset / OUTPUT_RECORD, output_record("dataset"))
    return {"seg": seg, "gan": gan, "earlier": earlier, "dataset": dataset}


def test_a_run_folder_of_another_kind_is_refused_and_kept(runs, sample_dataset, capsys):
    before = {name: snapshot(folder) for name, folder in runs.items()}
    gan = ["gan", "train", "--data", str(sample_dataset), "--kimg", "1"]
    seg = ["seg", "train", "--data", str(sample_dataset), "--epochs", "1"]
    refused(
        capsys,
        [*gan, "--out", str(runs["seg"])],
        f"{runs['seg']}: --out holds a segmentation run, not a GAN run",
        "or the folder of an earlier GAN run to continue it",
    )
    for kind, run in (
        ("GAN run", runs["gan"]),
        ("GAN run", runs["earlier"]),
        ("dataset", runs["dataset"]),
    ):
        refused(
            capsys, [*seg, "--out", str(run)], f"{run}: --out holds a {kind}, not a segmentation"
        )
    assert {name: snapshot(folder) for name, folder in runs.items()} == before


def test_publishing_over_a_run_says_so_without_advising_overwrite(runs, sample_root, capsys):
    before = snapshot(runs["gan"])
    err = refused(
        capsys,
        build_argv(sample_root, runs["gan"]),
        "--overwrite never replaces a training run's folder",
    )
    assert "pass --overwrite" not in err and snapshot(runs["gan"]) == before


# --- 2. a run that cannot take a step -----------------------------------------------------------


def test_a_batch_larger_than_the_train_split_is_refused_before_starting(
    sample_dataset, tmp_path, capsys, ray_session
):
    run = tmp_path / "run"
    refused(
        capsys,
        ["seg", "train", "--data", str(sample_dataset), "--out", str(run), "--batch-size", "64"],
        "batch_size = 64: the train split gives 42 images per epoch",
        "set batch_size (--batch-size) to 42 or less",
    )
    refused(
        capsys,
        ["seg", "train", "--data", str(sample_dataset), "--out", str(run), "--batch-size", "16"]
        + ["--workers", "3"],
        "14 for each of 3 workers",
        "to 14 or less",
    )
    assert not run.exists()


def test_encoder_weights_of_another_encoder_are_refused_before_the_run_folder_is_made(
    sample_dataset, tmp_path, capsys, ray_session
):
    import torch

    from defectforge.segmentation.models import build_model

    weights, run = tmp_path / "resnet34.pt", tmp_path / "run"
    torch.save(build_model("unet", "resnet34", 1, 2).encoder.state_dict(), weights)
    refused(
        capsys,
        ["seg", "train", "--data", str(sample_dataset), "--out", str(run)]
        + ["--encoder", "resnet18", "--encoder-weights", str(weights)],
        f"{weights}: ",
        "tensors of it are not in the encoder (e.g. layer",
    )
    assert not run.exists()


def test_a_training_epoch_without_a_step_fails():
    from defectforge.segmentation.config import SegConfig
    from defectforge.segmentation.loop import LoopIO, train_segmentation

    reported = []
    io = LoopIO(
        train_batches=lambda epoch: iter(()),  # what a drop-last pass over too few rows yields
        val_batches=lambda: iter(()),
        steps_per_epoch=1,
        report=lambda metrics, folder: reported.append(metrics),
    )
    cfg = SegConfig(
        data="ds", classes=("background", "defect"), channels=1, mean=(0.5,), std=(0.2,)
    )
    with pytest.raises(ConfigError, match="no training step ran; lower batch_size"):
        train_segmentation(cfg, io)
    assert reported == []  # no epoch, so no checkpoint to publish


# --- 3. an output inside an input -----------------------------------------------------------------


def test_an_out_inside_an_input_is_refused(sample_copy, labeller, capsys):
    before = snapshot(sample_copy)
    images = sample_copy / "images" / "val"
    for argv, inside in (
        (build_argv(sample_copy, sample_copy / "images" / "ds"), sample_copy),
        (["predict", "--model", str(labeller), "--images", str(images)], images),
        (["predict", "--model", str(labeller), "--images", str(sample_copy)], labeller),
    ):
        out = inside / "out"
        if argv[0] == "predict":
            argv = [*argv, "--out", str(out)]
        refused(capsys, argv, f"--out lies inside the input {inside}", "choose an --out outside")
        assert not out.exists()
    assert snapshot(sample_copy) == before


# --- 4. --address auto joins only the user's own cluster -------------------------------------


def test_address_auto_never_joins_another_ray_on_the_machine(sample_root, tmp_path, ray_session):
    """The session's Ray runs on this machine, as another user's job would; the user has no
    cluster of their own (a home of their own, no registry)."""
    out = tmp_path / "ds"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "XDG_"))}
    env.update(HOME=str(tmp_path), NO_ALBUMENTATIONS_UPDATE="1")
    done = subprocess.run(
        [*CLI, "--address", "auto", *build_argv(sample_root, out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert error_lines(done.stderr) == [
        "defectforge: error: --address auto: no cluster of yours is up, and auto never joins "
        "another Ray instance on this machine; start one with `defectforge cluster up`, or name "
        "the cluster: --address HOST:PORT or ray://HOST:10001"
    ]
    assert not out.exists()


def _record_cluster(state_dir: Path, address: str, head: subprocess.Popen) -> None:
    """A cluster's state as `cluster up` records it (``head``: its head's process, a session
    leader as `cluster up` starts it), listed in the user's registry."""
    started = local._start_time(head.pid) or "gone"
    node = local.NodeProcess("head", head.pid, started, str(state_dir / "head.log"))
    cluster = local.LocalCluster(state_dir)
    cluster._write_state({"address": address, "nodes": [node.__dict__]})
    cluster._register()


def _session_leader(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def test_address_auto_resolves_to_the_users_running_cluster_only(tmp_path, monkeypatch):
    from defectforge.trainables.runtime import ray_address

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    stopped = _session_leader("pass")
    stopped.wait()
    _record_cluster(tmp_path / "stopped", "127.0.0.1:1", stopped)
    with pytest.raises(ClusterError, match="no cluster of yours is up"):
        ray_address("auto")
    # A head that runs, at an address that answers: auto names that address.
    head = _session_leader("import time; time.sleep(300)")
    try:
        with socket.create_server(("127.0.0.1", 0)) as listening:
            address = f"127.0.0.1:{listening.getsockname()[1]}"
            _record_cluster(tmp_path / "mine", address, head)
            assert local.own_cluster_addresses() == {address: tmp_path / "mine"}
            assert ray_address("auto") == address
        # Inside a Ray Job, Ray names the job's cluster in RAY_ADDRESS: auto takes that one.
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
        with pytest.raises(ClusterError, match="127.0.0.1:1: nothing accepts a connection"):
            ray_address("auto")
    finally:
        head.kill()
        head.wait()
    assert local.own_cluster_addresses() == {}


# --- 5. one line instead of a traceback ----------------------------------------------------------


def test_a_crop_larger_than_every_image_is_refused_before_starting(
    sample_dataset, tmp_path, capsys, ray_session
):
    run = tmp_path / "run"
    refused(
        capsys,
        ["seg", "train", "--data", str(sample_dataset), "--out", str(run)]
        + ["--crop-size", "999936"],
        "crop_size = 999936: larger than every train image (the longest train image side is "
        "200 px)",
        "set crop_size (--crop-size) to 224 or less, or to 0 for whole images",
    )
    assert not run.exists()


def test_an_address_nothing_answers_at_fails_at_once(sample_root, tmp_path, capsys):
    out = tmp_path / "ds"
    for address in ("ray://127.0.0.1:1", "127.0.0.1:1"):
        started = time.monotonic()
        refused(
            capsys,
            ["--address", address, *build_argv(sample_root, out)],
            f"{address}: nothing accepts a connection there (connection refused)",
        )
        assert time.monotonic() - started < 10
    refused(capsys, ["--address", "ray://[::1", *build_argv(sample_root, out)], "not a Ray address")
    assert not out.exists()


@pytest.fixture
def spec_file(tmp_path) -> Path:
    spec = {
        "name": "edges",
        "dataset": {"real": str(tmp_path / "data")},
        "search_space": {"epochs": 1},
        "search": {"algorithm": "grid"},
        "storage_path": str(tmp_path / "studies"),
        "final": {"seeds": 0},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_submit_refuses_a_name_that_is_no_name_before_connecting(spec_file, capsys):
    # Nothing listens at port 1: the refusal comes before any connection.
    for name in ("a/b", "..", ""):
        refused(
            capsys,
            ["submit", str(spec_file), "--address", "http://127.0.0.1:1", "--name", name],
            f"--name {name!r}: ",
            "give one folder's name",
        )
    # Job ids go into the Jobs API's URL paths: what a name may still hold is made safe there.
    assert jobs.id_part("my study #2?") == "my-study-2"


# --- 6. names are names ---------------------------------------------------------------------------


def test_a_study_name_never_leads_outside_storage(spec_file, tmp_path, capsys):
    refused(
        capsys,
        ["study", "run", str(spec_file), "--name", "../x"],
        "--name '../x': holds a path separator",
    )
    spec = yaml.safe_load(spec_file.read_text())
    spec_file.write_text(yaml.safe_dump({**spec, "name": "../y"}))
    refused(capsys, ["study", "run", str(spec_file)], "name = '../y': holds a path separator")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_a_dataset_name_is_a_name(sample_root, tmp_path, capsys):
    refused(
        capsys,
        build_argv(sample_root, tmp_path / "ds", "--name", "a/b"),
        "name = 'a/b': must be one folder's name",
    )
    assert not (tmp_path / "ds").exists()


# --- 8. a token file that is not there ------------------------------------------------------------


def test_a_missing_token_file_is_reported_as_a_missing_file(spec_file, tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    for argv in (
        ["jobs", "list", "--address", "http://127.0.0.1:1"],
        ["submit", str(spec_file), "--address", "http://127.0.0.1:1", "--no-pip"],
    ):
        refused(capsys, [*argv, "--token-file", str(missing)], f"--token-file {missing}: no such")
        refused(capsys, [*argv, "--token-file", str(empty)], "the file is empty")


# --- 9. leftovers of a killed build; a build without a val split ---------------------------------


def test_a_killed_builds_staging_folder_is_cleared_by_the_rerun(
    sample_root, tmp_path, capsys, ray_session
):
    out = tmp_path / "ds"
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys\n"
            "from defectforge.core.outputs import publish_dir\n"
            "writing = publish_dir(sys.argv[1])\n"
            "writing.__enter__()\n"
            "os.kill(os.getpid(), 9)",
            str(out),
        ],
        timeout=120,
    )
    assert killed.returncode == -9
    [left] = [p for p in tmp_path.iterdir() if p.name.startswith(f".ds.{STAGING}-")]
    live = new_staging(out, STAGING)  # another writer of this --out, still at work
    capsys.readouterr()
    assert main(build_argv(sample_root, out)) == 0
    assert not left.exists() and live.is_dir()
    assert json.loads((out / OUTPUT_RECORD).read_text())["kind"] == "dataset"
    shutil.rmtree(live)


def test_a_build_without_a_val_split_says_so(sample_copy, tmp_path, capsys, ray_session):
    for folder in ("images", "masks"):
        shutil.rmtree(sample_copy / folder / "val")
    capsys.readouterr()
    assert main(build_argv(sample_copy, tmp_path / "ds")) == 0
    err = error_lines(capsys.readouterr().err)
    assert err == [
        f"defectforge: warning: {tmp_path / 'ds'}: the build of {sample_copy} gave no val split "
        "(42 train, 0 val, 0 test images), so `seg train` and studies will refuse this dataset; "
        "add images/val with masks/val"
    ]


def test_a_run_folder_asked_to_continue_another_network_names_the_setting(tmp_path):
    import json

    import torch

    from defectforge.core.errors import ConfigError
    from defectforge.core.storage import Location
    from defectforge.segmentation.config import CHECKPOINT_KEYS
    from defectforge.trainables.runtime import refuse_another_run

    epoch = tmp_path / "run" / "ray" / "one-worker" / "epoch_001"
    epoch.mkdir(parents=True)
    torch.save({}, epoch / "state.pt")
    (epoch / "epoch_metrics.json").write_text("{}")
    saved = {"arch": "deeplabv3plus", "encoder": "resnet18", "classes": ["background", "dent"]}
    (epoch / "config.json").write_text(json.dumps(saved))
    run = Location.of(tmp_path / "run")
    same = {**saved, "classes": ("background", "dent"), "epochs": 30}
    refuse_another_run(run, same, CHECKPOINT_KEYS)  # more epochs of the same network
    with pytest.raises(
        ConfigError, match="arch = 'unet': .* holds a run of arch = 'deeplabv3plus'"
    ):
        refuse_another_run(run, {**same, "arch": "unet"}, CHECKPOINT_KEYS)
    refuse_another_run(Location.of(tmp_path / "new"), same, CHECKPOINT_KEYS)  # nothing there


def test_a_seed_numpy_cannot_take_is_refused_where_it_is_given():
    """Found probing the GAN commands: `gan train --seed -1` and `synth copy-paste --seed -1`
    ended in a NumPy traceback after the run folder was made; `gan generate --first-seed
    4294967295 --count 2` in another."""
    from defectforge.datasets.copy_paste import CopyPasteConfig
    from defectforge.gan.config import GanConfig, GenerateConfig
    from defectforge.segmentation.config import SegConfig

    for make in (
        lambda seed: GanConfig(data="d", channels=1, seed=seed),
        lambda seed: CopyPasteConfig(count=1, seed=seed),
        lambda seed: SegConfig("d", ("bg", "d"), 1, (0.5,), (0.2,), seed=seed),
    ):
        with pytest.raises(ConfigError, match=r"seed = -1: must be from 0 to 2\^32 - 1"):
            make(seed=-1)
    with pytest.raises(ConfigError, match=r"the last worker's seed is above 2\^32 - 1"):
        SegConfig("d", ("bg", "d"), 1, (0.5,), (0.2,), seed=2**32 - 1, workers=2)
    assert GenerateConfig(first_seed=2**32 - 2, count=2).seeds()[-1] == 2**32 - 1


def test_the_line_after_ctrl_c_says_whether_a_snapshot_is_kept(tmp_path):
    """Found probing: Ctrl-C before the first snapshot said "continue from the latest snapshot",
    and --resume then found none."""
    import argparse
    import zipfile

    from defectforge.cli.gan import interrupted_hint

    args = argparse.Namespace(gan_command="train", out=str(tmp_path / "run"))
    assert interrupted_hint(args) == (
        "no snapshot was reached, so nothing is kept; run the same command to start over"
    )
    kept = tmp_path / "run" / "ray" / "train" / "kimg_00004.000"
    kept.mkdir(parents=True)
    with zipfile.ZipFile(kept / "state.pt", "w") as archive:  # a whole checkpoint's file
        archive.writestr("data", b"0")
    assert interrupted_hint(args).endswith("continue from its latest snapshot (kimg_00004.000)")


def test_a_gan_that_learns_masks_refuses_train_images_without_a_defect(
    sample_dataset, tmp_path, ray_session
):
    """Found probing: `gan train --masks` on images built as defect-free published a generator
    whose "exact masks" were noise."""
    import cv2
    import numpy as np

    from defectforge.gan.config import GanConfig
    from defectforge.trainables.gan_reals import check_defects_to_learn

    raw = tmp_path / "raw"
    raw.mkdir()
    for index in range(12):
        grey = np.random.default_rng(index).integers(0, 255, (32, 32), dtype=np.uint8)
        cv2.imwrite(str(raw / f"plain{index}.png"), grey)
    clean = tmp_path / "clean"
    build = ["data", "build", "--source", "folder", "--root", str(raw), "--out", str(clean)]
    build += ["--missing-mask", "background", "--classes", "background,defect"]
    assert main(build) == 0
    for flags in ({"masks": True}, {"native_crops": True, "defect_crops": 0.5}):
        cfg = GanConfig(data=str(clean), channels=1, classes=("defect",), **flags)
        with pytest.raises(DataError, match=r"none of its \d+ train images has a defect pixel"):
            check_defects_to_learn(cfg)
    classes = ("inclusion", "patches", "scratches")
    check_defects_to_learn(GanConfig(str(sample_dataset), 1, classes=classes, masks=True))


@pytest.mark.parametrize("where", ["disk", "store"])
def test_a_gan_run_still_training_names_its_latest_snapshot(where, tmp_path, request):
    """Found probing: `gan generate --model RUN` on a run still training said config.json was
    missing from a folder "not written by gan train"; on a store too (its local copy holds the
    run's top-level files only)."""
    from defectforge.core.storage import Location
    from defectforge.gan.checkpoint import gan_run_config, load_generator

    if where == "store":
        bucket = request.getfixturevalue("s3_server").make_bucket("training")
        run = Location.of(f"{bucket}/gan-run")
        (run / "progress.jsonl").write_text("{}\n")
    else:
        run = Location.of(tmp_path)
    for kimg in ("kimg_00004.000", "kimg_00052.000"):
        (run / "snapshots" / kimg / "generator.pt").write_bytes(b"")
    latest = run / "snapshots" / "kimg_00052.000"
    for read in (load_generator, gan_run_config):
        with pytest.raises(DataError, match="has not published a generator yet") as refused:
            read(run.uri)
        assert f"e.g. the latest: {latest}," in str(refused.value)


def test_gan_metrics_scores_the_runs_own_data_only_while_it_is_unchanged(
    sample_dataset, generated, capsys
):
    """Found probing: after the run's data was replaced, `gan metrics` scored it against the
    replacement without a word; `--every-snapshot --data X` wrote the run's own history
    against its own data while X was asked for."""
    from dataclasses import replace

    from defectforge.gan.checkpoint import gan_run_config
    from defectforge.trainables.gan_samples import _refuse_changed_data

    run = generated.parent / "run"
    cfg = gan_run_config(run)
    _refuse_changed_data(cfg)  # unchanged: scored
    with pytest.raises(DataError, match="is no longer the dataset this generator learnt from"):
        _refuse_changed_data(replace(cfg, data_manifest_id="0123456789abcdef"))
    for extra in (["--data", str(sample_dataset)], ["--class", "patches"]):
        assert main(["gan", "metrics", "--model", str(run), "--every-snapshot", *extra]) == 2
        assert f"{extra[0]} with --every-snapshot" in capsys.readouterr().err


def test_a_seed_given_twice_to_gan_generate_is_refused():
    """Found probing: `--seeds 1,1,1` wrote three rows under one id and one PNG."""
    from defectforge.cli.gan import parse_seeds

    with pytest.raises(ConfigError, match="seed 1 is given twice; give each once"):
        parse_seeds("1,2,1", None)
    assert parse_seeds("3-5", None) == [3, 4, 5]


def test_use_gpu_where_no_node_has_one_is_said_not_waited_on_silently(ray_session, capsys):
    """Found probing: `gan train --use-gpu` on a machine without a GPU sat at 0 kimg for
    minutes without a word."""
    from defectforge.trainables.runtime import warn_of_missing

    warn_of_missing({"GPU": 1, "CPU": 1}, "--use-gpu", "leave out --use-gpu")
    err = capsys.readouterr().err
    assert err.startswith("defectforge: warning: --use-gpu asks for 1 GPU and the nodes of ")
    assert err.rstrip().endswith("leave out --use-gpu)") and "CPU" not in err


def test_a_generate_range_past_the_last_seed_is_refused_where_it_is_written():
    """A spec's `generate: {first_seed: ...}` is checked when the spec is read, not after the
    GAN stage has trained (review)."""
    from defectforge.gan.config import GenerateConfig

    with pytest.raises(ConfigError, match=r"the last seed, 4294967296, is above 2\^32 - 1"):
        GenerateConfig(first_seed=2**32 - 1, count=2)

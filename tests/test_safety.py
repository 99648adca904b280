"""Nothing a user types may destroy data, hang, or end in a traceback (issue 14).

Every refusal is checked the same way: exit code 2, one line on stderr naming the file and the
fix, and nothing lost or left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_checks import can_unshare, error_lines, refused, snapshot

from defectforge.cli import main
from defectforge.core.errors import DataError
from defectforge.core.outputs import GAN_RUN, OUTPUT_RECORD, publish_dir


def no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# --- 1. --out over an input, --overwrite over a folder defectforge did not write -------------


def build_over(root: Path, out: Path) -> list[str]:
    """`data build` of ``root`` into ``out`` with --overwrite."""
    return [
        "data",
        "build",
        "--source",
        "neu-seg",
        "--root",
        str(root),
        "--out",
        str(out),
        "--overwrite",
    ]


def test_build_into_its_own_root_is_refused_and_the_raw_images_stay(sample_copy, capsys):
    before = snapshot(sample_copy)
    for out in (sample_copy, sample_copy.parent):
        refused(
            capsys,
            build_over(sample_copy, out),
            f"{out}: --out is the input {sample_copy} or contains it",
            "choose an --out outside",
        )
    assert snapshot(sample_copy) == before


def test_overwrite_refuses_a_folder_defectforge_did_not_write(sample_root, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes")
    refused(
        capsys,
        build_over(sample_root, notes),
        f"{notes}: output folder already exists, and --overwrite replaces only folders "
        "defectforge wrote",
        "move the folder away yourself",
    )
    assert (notes / "todo.txt").read_text() == "my notes" and no_leftovers(tmp_path)


def test_overwrite_never_replaces_a_training_run(sample_root, tmp_path, capsys):
    from defectforge.core.outputs import prepare_run_folder

    run = prepare_run_folder(tmp_path / "gan-run", GAN_RUN)
    (run / "snapshot.pt").write_bytes(b"hours of training")
    earlier = tmp_path / "earlier-run"  # a run of an earlier version: Ray storage, no record
    (earlier / "ray").mkdir(parents=True)
    (earlier / "manifest.json").write_text('{"schema_version": 1}')
    for folder in (run, earlier):
        refused(
            capsys,
            build_over(sample_root, folder),
            f"{folder}: --overwrite never replaces a training run's folder",
            "move the run away yourself",
        )
    assert (run / "snapshot.pt").read_bytes() == b"hours of training"
    assert (earlier / "ray").is_dir() and no_leftovers(tmp_path)


def test_overwrite_never_replaces_an_output_of_another_kind(
    labeller, sample_dataset, sample_copy, tmp_path, capsys
):
    dataset = tmp_path / "dataset"
    shutil.copytree(sample_dataset, dataset)
    before = snapshot(dataset)
    for argv in (
        ["seg", "export", str(labeller), "--out", str(dataset), "--overwrite"],
        ["predict", "--model", str(labeller), "--images", str(sample_copy / "images" / "val")]
        + ["--out", str(dataset), "--overwrite"],
    ):
        refused(
            capsys,
            argv,
            f"{dataset}: --overwrite replaces only an output of the same kind, and this folder "
            "holds a dataset, not ",
            "move the dataset away yourself",
        )
    assert snapshot(dataset) == before


@pytest.mark.parametrize(
    "command",
    [
        ["data", "augment", "--data", "{data}", "--out", "{data}", "--overwrite"],
        ["data", "mix", "--real", "{data}", "--synthetic", "{labelled}", "--ratio", "0.1"]
        + ["--out", "{labelled}/..", "--overwrite"],
        ["synth", "label", "--images", "{generated}", "--labeller", "{labeller}"]
        + ["--out", "{generated}", "--overwrite"],
        ["gan", "generate", "--model", "{labeller}", "--out", "{labeller}", "--overwrite"],
        ["seg", "export", "{labeller}", "--out", "{labeller}", "--overwrite"],
        ["seg", "train", "--data", "{data}", "--out", "{data}"],
        ["predict", "--model", "{labeller}", "--images", "{images}", "--out", "{images}/.."]
        + ["--overwrite"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_every_command_refuses_an_out_over_its_inputs(
    command, sample_dataset, labelled, generated, labeller, sample_copy, capsys, ray_session
):
    paths = {
        "data": sample_dataset,
        "labelled": labelled,
        "generated": generated,
        "labeller": labeller,
        "images": sample_copy / "images" / "val",
    }
    argv = [part.format(**paths) for part in command]
    watched = [paths[key] for key in paths if any(f"{{{key}}}" in part for part in command)]
    before = [snapshot(folder) for folder in watched]
    refused(capsys, argv, "or contains it", "choose an --out outside")
    assert [snapshot(folder) for folder in watched] == before


def test_overwrite_replaces_what_defectforge_wrote(sample_root, tmp_path, capsys, ray_session):
    out = tmp_path / "ds"
    argv = ["data", "build", "--source", "neu-seg", "--root", str(sample_root), "--out", str(out)]
    assert main(argv) == 0
    assert json.loads((out / OUTPUT_RECORD).read_text())["kind"] == "dataset"
    refused(capsys, argv, f"{out}: output folder already exists", "pass --overwrite")
    assert main([*argv, "--overwrite", "--test-fraction", "0.2"]) == 0
    assert json.loads((out / "manifest.json").read_text())["counts"]["test"]["total"] > 0
    assert no_leftovers(tmp_path)


# --- 2. two writers of one --out ---------------------------------------------------------------


def test_a_training_run_that_took_the_folder_meanwhile_is_not_replaced(tmp_path):
    from defectforge.core.outputs import output_record

    final = tmp_path / "out"
    with publish_dir(final) as first:
        (first / "who.txt").write_text("earlier output")
    with pytest.raises(DataError, match="the folder was replaced meanwhile"):
        with publish_dir(final, overwrite=True) as staging:
            (staging / "who.txt").write_text("new output")
            # meanwhile `gan train --out out` took the folder over as its run
            (final / OUTPUT_RECORD).write_text(json.dumps(output_record("GAN run")))
            (final / "snapshot.pt").write_bytes(b"hours of training")
    assert (final / "snapshot.pt").read_bytes() == b"hours of training"
    assert no_leftovers(tmp_path)


def test_the_second_of_two_concurrent_writers_fails_and_the_first_result_stands(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(DataError, match="another run wrote this folder while this one was running"):
        with publish_dir(final) as first:
            (first / "who.txt").write_text("first")
            with publish_dir(final) as second:  # both started before either finished
                (second / "who.txt").write_text("second")
            assert (final / "who.txt").read_text() == "second"  # the inner one finished first
    assert (final / "who.txt").read_text() == "second"
    assert no_leftovers(tmp_path)


def driver_env() -> dict[str, str]:
    """A command-line process's environment: it joins the session's Ray as a driver of its own."""
    import ray

    address = ray.get_runtime_context().gcs_address
    return {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_ADDRESS": address}


def test_concurrent_builds_to_one_out_leave_one_whole_dataset(sample_root, tmp_path, ray_session):
    """Two real `data build` processes, started together without --overwrite."""
    out = tmp_path / "ds"
    command = [sys.executable, "-m", "defectforge.cli", "data", "build"]
    command += ["--source", "neu-seg", "--root", str(sample_root), "--out", str(out)]
    env = driver_env()
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = error_lines(next(err for code, err in results if code == 2))[-1]
    assert str(out) in loser and ("already exists" in loser or "another run wrote" in loser)
    assert json.loads((out / "manifest.json").read_text())["counts"]["train"]["total"] == 42
    assert no_leftovers(tmp_path)


# --- 6. workers and actors never starve Ray Data --------------------------------------------


def test_more_workers_than_the_cluster_can_feed_are_refused_before_anything(
    sample_dataset, tmp_path, capsys, ray_session
):
    refused(
        capsys,
        ["seg", "train", "--data", str(sample_dataset), "--out", str(tmp_path / "run")]
        + ["--workers", "8"],
        "8 workers need at least 3 CPUs",
        "this Ray cluster has 2",
    )
    assert not (tmp_path / "run").exists()


# --- 7, 8. files that lie, are locked, or claim to be huge ----------------------------------


def _png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` grey pixels (data cut short)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_a_huge_header_is_refused_before_decoding_and_skip_bad_skips_it(
    sample_copy, tmp_path, capsys, ray_session
):
    victim = sorted((sample_copy / "images" / "train").glob("*.jpg"))[0]
    victim.with_suffix(".png").write_bytes(_png_header_claiming(100_000, 100_000))
    victim.unlink()
    argv = ["data", "build", "--source", "neu-seg", "--root", str(sample_copy)]
    refused(
        capsys,
        [*argv, "--out", str(tmp_path / "a")],
        f"{victim.with_suffix('.png')}: image header claims 100000 x 100000 pixels",
        "above the limit of 100 MP",
        "--max-pixels",
    )
    assert not (tmp_path / "a").exists()
    assert main([*argv, "--out", str(tmp_path / "b"), "--skip-bad"]) == 0
    rejected = (tmp_path / "b" / "rejected.csv").read_text()
    assert victim.stem in rejected and "header claims" in rejected
    refused(
        capsys,
        [*argv, "--out", str(tmp_path / "c"), "--max-pixels", "1000", "--skip-bad"],
        "every sample was rejected",
    )


def test_an_unreadable_file_is_a_data_error_naming_it(sample_copy, monkeypatch):
    from defectforge.datasets.discover import discover_neu_seg
    from defectforge.datasets.readers import load_sample
    from defectforge.datasets.samples import SampleSpec

    ref = discover_neu_seg(sample_copy)[0]
    original = Path.read_bytes

    def locked(path: Path) -> bytes:
        if str(path) == ref.image_path:
            raise PermissionError(13, "Permission denied", str(path))
        return original(path)

    monkeypatch.setattr(Path, "read_bytes", locked)  # root reads chmod-000 files anyway
    with pytest.raises(DataError, match="image cannot be read: permission denied; make it"):
        load_sample(ref, SampleSpec("neu-seg", ("background", "a", "b", "c"), 1))


def test_a_png_named_jpg_is_read_by_its_content(sample_copy):
    from defectforge.datasets.images import decode_file

    jpg = sorted((sample_copy / "images" / "train").glob("*.jpg"))[0]
    pixels = cv2.imread(str(jpg), cv2.IMREAD_UNCHANGED)
    ok, png = cv2.imencode(".png", pixels)
    jpg.write_bytes(png.tobytes())
    assert np.array_equal(decode_file(jpg), pixels)
    jpg.write_bytes(png.tobytes()[:-30])
    with pytest.raises(DataError, match=r"PNG is truncated .*its content is PNG, not what .jpg"):
        decode_file(jpg)


# --- 9. paths leave the command line absolute ------------------------------------------------


def test_relative_paths_are_made_absolute_where_they_are_given(tmp_path, monkeypatch):
    from defectforge.cli import parser

    monkeypatch.chdir(tmp_path)
    args = parser().parse_args(
        ["data", "build", "--source", "folder", "--root", "raw", "--out", "ds"]
    )
    assert args.root == str(tmp_path / "raw") and args.out == str(tmp_path / "ds")
    args = parser().parse_args(["seg", "train", "--data", "ds", "--out", "r", "--synthetic", "s"])
    assert args.synthetic == str(tmp_path / "s")


# --- 10, 11. damaged models and datasets ------------------------------------------------------


def test_damaged_model_files_are_one_line_naming_the_file(labeller, sample_copy, tmp_path, capsys):
    images = sample_copy / "images" / "val"
    run = tmp_path / "run"
    shutil.copytree(labeller, run)
    argv = ["predict", "--model", str(run), "--images", str(images), "--out", str(tmp_path / "p")]
    weights = run / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = refused(capsys, argv, f"{weights}: model weights file is damaged", "copy it again")
    assert "weights_only" not in err
    shutil.copy(labeller / "model.pt", weights)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "arch": "unet"}))
    refused(capsys, argv, f"{weights}: the weights do not fit the network that config.json")
    (run / "config.json").write_text("{not json")
    refused(capsys, argv, f"{run / 'config.json'}: not a valid segmentation config")
    (run / "config.json").write_text(json.dumps({**config, "arch": "segnet"}))
    refused(capsys, argv, "config.json: not a valid segmentation config", "unknown architecture")
    assert not (tmp_path / "p").exists()


def test_a_truncated_parquet_file_is_one_line_suggesting_a_rebuild(
    sample_dataset, tmp_path, capsys, ray_session
):
    data = tmp_path / "ds"
    shutil.copytree(sample_dataset, data)
    damaged = sorted((data / "train").glob("*.parquet"))[0]
    damaged.write_bytes(damaged.read_bytes()[:5000])
    refused(
        capsys,
        ["seg", "train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1"],
        f"{damaged}: Parquet file is truncated, corrupt or unreadable",
        "rebuild the dataset",
    )
    assert not (tmp_path / "run").exists()


# --- 12. option values -------------------------------------------------------------------------


def test_negative_steps_per_epoch_are_refused_before_anything(sample_dataset, tmp_path, capsys):
    refused(
        capsys,
        ["seg", "train", "--data", str(sample_dataset), "--out", str(tmp_path / "run")]
        + ["--max-steps-per-epoch", "-1"],
        "max_steps_per_epoch = -1: must be >= 0",
    )
    assert not (tmp_path / "run").exists()


# --- 13. failures leave nothing behind; Ctrl-C is one line -----------------------------------


def test_failed_commands_leave_no_empty_folder(sample_dataset, tmp_path, capsys, ray_session):
    refused(
        capsys,
        ["seg", "train", "--data", str(sample_dataset), "--out", str(tmp_path / "r"), "--resume"],
        "no checkpoint to resume from",
    )
    refused(
        capsys,
        ["predict", "--model", str(tmp_path), "--images", str(tmp_path / "nope")]
        + ["--out", str(tmp_path / "p")],
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_in_training_is_one_line_and_exit_130(stop, sample_dataset, tmp_path, ray_session):
    """Ctrl-C, or a scheduler's stop (SIGTERM), while the run trains."""
    command = [sys.executable, "-m", "defectforge.cli", "seg", "train"]
    command += ["--data", str(sample_dataset), "--out", str(tmp_path / "run"), "--epochs", "50"]
    command += ["--crop-size", "64", "--batch-size", "4", "--max-steps-per-epoch", "2"]
    command += ["--image-size", "64"]  # each epoch's validation pass at a tenth of 200 px
    env = driver_env()
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        run = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        progress = tmp_path / "run" / "progress.jsonl"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and (
            not progress.is_file() or len(progress.read_text().splitlines()) < 2
        ):
            assert run.poll() is None, log.read_text()[-2000:]
            time.sleep(0.5)
        run.send_signal(stop)
        code = run.wait(timeout=120)
    text = log.read_text()
    assert code == 130, text[-2000:]
    ours = [line for line in text.splitlines() if line.startswith("defectforge:")]
    assert len(ours) == 1 and re.fullmatch(
        r"defectforge: interrupted; run the same command again to continue from its latest "
        r"checkpoint \(epoch_\d+\)",
        ours[0],
    ), ours
    # No traceback of the command itself (Ray's own actors log theirs with a "(name pid=..)"
    # prefix, e.g. when another Ray instance runs on the machine).
    assert not re.search(r"^Traceback", text, re.MULTILINE), text[-3000:]
    # The same run again continues from the epochs saved before the interruption.
    from defectforge.trainables.epochs import epoch_of
    from defectforge.trainables.seg import config_from_manifest, run_seg_training

    kept = (tmp_path / "run" / "ray" / "one-worker").glob("epoch_*/epoch_metrics.json")
    latest = max(epoch_of(marker.parent.name) for marker in kept)
    if stop == signal.SIGTERM:
        return  # both signals end in the same KeyboardInterrupt: one resume check is enough
    lines = len((tmp_path / "run" / "progress.jsonl").read_text().splitlines())
    cfg = config_from_manifest(
        sample_dataset,
        epochs=latest + 2,
        crop_size=64,
        batch_size=4,
        max_steps_per_epoch=2,
        image_size=64,
    )
    history = run_seg_training(cfg, tmp_path / "run")["history"]
    assert [row["epoch"] for row in history] == list(range(latest + 2))
    assert len((tmp_path / "run" / "progress.jsonl").read_text().splitlines()) == lines + 1


def test_a_checkpoint_cut_short_by_a_kill_is_not_resumed_from(tmp_path):
    import torch

    from defectforge.trainables.runtime import latest_checkpoint_dir

    whole, cut = tmp_path / "run" / "epoch_001", tmp_path / "run" / "epoch_002"
    for folder in (whole, cut):
        folder.mkdir(parents=True)
        torch.save({"weights": torch.zeros(1000)}, folder / "model.pt")
    data = (cut / "model.pt").read_bytes()
    (cut / "model.pt").write_bytes(data[: len(data) // 2])  # the copy killed half-way
    assert latest_checkpoint_dir(tmp_path).local == whole


def test_a_one_worker_epoch_folder_without_its_marker_is_not_resumed_from(tmp_path):
    import torch

    from defectforge.trainables.epochs import EPOCH_METRICS
    from defectforge.trainables.runtime import latest_checkpoint_dir

    run = tmp_path / "one-worker"
    for name in ("epoch_001", "epoch_002"):
        (run / name).mkdir(parents=True)
        torch.save({"weights": torch.zeros(10)}, run / name / "model.pt")
    (run / "epoch_001" / EPOCH_METRICS).write_text("{}")  # epoch_002: killed before its marker
    assert latest_checkpoint_dir(tmp_path).local == run / "epoch_001"
    (run / "epoch_001" / EPOCH_METRICS).unlink()  # the first epoch's folder, cut short too
    assert latest_checkpoint_dir(tmp_path) is None


def _folder_of_a_killed_writer(make_folder: str, parent: Path) -> Path:
    """The folder ``make_folder`` (Python that sets ``folder``, given ``parent`` as argv[1])
    makes in a process that writes a file into it and is then killed with SIGKILL."""
    script = (
        f"import os, sys\n{make_folder}(folder / 'model.pt').write_bytes(bytes(999))\n"
        "print(folder, flush=True)\nos.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(parent)], capture_output=True, text=True
    )
    left = Path(done.stdout.strip())
    assert done.returncode == -9 and (left / "model.pt").is_file(), done.stderr[-2000:]
    return left


def test_scratch_a_killed_process_left_is_removed_by_the_next_one(tmp_path):
    """A trial Ray stops, or a driver ended with SIGKILL, cannot remove its temporary folders
    (each up to a checkpoint in size): the next process on that host does, and no other's."""
    from defectforge.core.files import scratch_folder

    left = _folder_of_a_killed_writer(
        "from defectforge.core.files import scratch_path\n"
        "folder = scratch_path('ckpt', sys.argv[1])\n",
        tmp_path,
    )
    other_host = tmp_path / "defectforge-another-host-1-x1y2.ckpt"
    other_host.mkdir()
    unrelated = tmp_path / "defectforge-notes"
    unrelated.mkdir()

    with scratch_folder("ckpt", tmp_path) as folder:
        assert not left.exists() and Path(folder).is_dir()
        assert other_host.is_dir() and unrelated.is_dir()
    assert not Path(folder).exists()


def test_a_staging_folder_a_killed_writer_left_is_cleared_by_the_next_output_beside_it(tmp_path):
    """Found probing: after a SIGKILL (an out-of-memory kill) during `predict --out A`, the
    hidden `.A.partial-*` folder stayed until something wrote A again, which may never be."""
    from defectforge.core.outputs import publish_dir

    left = _folder_of_a_killed_writer(
        "from pathlib import Path\nfrom defectforge.core.outputs import publish_dir\n"
        "writing = publish_dir(Path(sys.argv[1]) / 'first')\nfolder = writing.__enter__()\n",
        tmp_path,
    )
    with publish_dir(tmp_path / "live-writer") as live:  # a writer still at work is left alone
        with publish_dir(tmp_path / "second") as staging:
            (staging / "mask.png").write_bytes(b"")
        assert Path(live).is_dir()
    assert not left.exists() and (tmp_path / "second" / "mask.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live-writer", "second"]


IN_A_NEW_PID_NAMESPACE = ("--pid", "--fork", "--mount-proc")


@pytest.mark.skipif(
    not can_unshare(*IN_A_NEW_PID_NAMESPACE), reason="needs Linux pid namespaces (root)"
)
def test_scratch_of_a_live_process_is_kept_by_one_in_another_pid_namespace(tmp_path):
    """Containers that share a host name and a folder (host networking, a mounted /tmp) do not
    see each other's processes: one must not take another's live writer for a dead one."""
    from defectforge.core.files import scratch_path

    mine = scratch_path("ckpt", tmp_path)
    (mine / "model.pt").write_bytes(bytes(999))
    # Making a scratch folder of its own is when a process clears those of dead writers.
    in_a_container = (
        "import sys\n"
        "from defectforge.core.files import scratch_folder\n"
        "with scratch_folder('ckpt', sys.argv[1]):\n"
        "    pass\n"
    )
    command = ["unshare", *IN_A_NEW_PID_NAMESPACE, sys.executable, "-c"]
    done = subprocess.run([*command, in_a_container, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (mine / "model.pt").is_file()

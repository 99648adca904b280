"""Every location on object storage, against a real S3-compatible server (SeaweedFS, started by
the session's `s3_server` fixture and reached through the standard AWS variables only): a
dataset built (its copied images listed there), trained on, exported and served from a bucket,
with `predict` in a fresh process that starts no Ray; copy-paste sets made and combined there;
the publish rules where there is no rename; one line for a store that refuses, is missing or
cannot be reached, from the client or from a node; and no credential in anything written. The
GAN on a store (two workers, resume) is in test_gan.py, a pipeline on a cluster whose nodes
share no folder in test_cluster_jobs.py."""

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from cli_checks import error_lines, fake_gan_run
from s3server import PREFIX_GRANTED, PREFIX_KEY, PREFIX_SECRET, credentials, objects_holding

from defectforge.cli import main
from defectforge.core.errors import DataError
from defectforge.core.outputs import OUTPUT_RECORD, publish_dir
from defectforge.core.storage import Location, StorageError
from defectforge.datasets.contract import read_split_table
from defectforge.datasets.manifest import Manifest
from defectforge.trainables.runtime import check_storage_everywhere


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return s3_server.make_bucket("objects")


def test_a_dataset_a_run_and_an_export_on_a_store_serve_predict_without_ray(
    ray_session, bucket, sample_root, sample_copy, tmp_path, capsys
):
    data, run, export = f"{bucket}/data/neu", f"{bucket}/runs/seg", f"{bucket}/exports/seg"
    # A val image copied into train: the build keeps both in val and lists them on the store.
    copied = sorted((sample_copy / "images" / "val").glob("*.jpg"))[0]
    shutil.copy(copied, sample_copy / "images" / "train" / "copy.jpg")
    shutil.copy(
        sample_copy / "masks" / "val" / f"{copied.stem}.png",
        sample_copy / "masks" / "train" / "copy.png",
    )
    build = ["data", "build", "--source", "neu-seg", "--root", str(sample_copy), "--out", data]
    assert main(build) == 0
    assert {split: c.total for split, c in Manifest.load(data).counts.items()} == {
        "train": 42,
        "val": 16,
        "test": 0,
    }
    assert read_split_table(data, "val").num_rows == 16
    twins = list(csv.DictReader(io.StringIO((Location.of(data) / "twins.csv").read_text())))
    assert sorted((row["given_split"], row["split"]) for row in twins) == [
        ("train", "val"),
        ("val", "val"),
    ]
    assert main(build) == 2  # the publish rules hold on the store
    assert "output folder already exists" in capsys.readouterr().err

    train = ["seg", "train", "--data", data, "--out", run, "--epochs", "1"]
    train += ["--max-steps-per-epoch", "2", "--crop-size", "64", "--batch-size", "4"]
    assert main(train) == 0
    assert (Location.of(run) / "model.pt").is_file()
    assert main(["seg", "export", run, "--out", export]) == 0
    capsys.readouterr()
    # --overwrite replaces only an output of its own kind, read from the record on the store.
    assert main(["seg", "export", run, "--out", data, "--overwrite"]) == 2
    assert "this folder holds a dataset, not an export" in capsys.readouterr().err
    assert read_split_table(data, "val").num_rows == 16

    # A production line: a fresh process, the standard variables, a cache of its own, no Ray.
    program = (
        "import sys; from defectforge.cli import main; code = main(sys.argv[1:]); "
        "assert 'ray' not in sys.modules, 'predict imported Ray'; sys.exit(code)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["DEFECTFORGE_CACHE"] = str(tmp_path / "cache")
    out = tmp_path / "masks"
    images = str(sample_root / "images" / "val")
    done = subprocess.run(
        [sys.executable, "-c", program, "predict", "--model", export, "--images", images]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(out.glob("*_mask.png"))) == 15

    # Predictions published on the store, one unreadable image skipped and counted.
    images_with_a_bad_one = tmp_path / "line"
    shutil.copytree(images, images_with_a_bad_one)
    (images_with_a_bad_one / "broken.jpg").write_bytes(b"not an image")
    on_store = ["--out", f"{bucket}/predictions", "--skip-bad"]
    assert (
        main(["predict", "--model", export, "--images", str(images_with_a_bad_one), *on_store]) == 0
    )
    reported = capsys.readouterr().out
    assert "15 images: " in reported and "1 skipped as bad, listed in rejected.csv" in reported

    printed = reported + done.stdout + done.stderr
    assert not any(secret in printed for secret in credentials())
    assert objects_holding(bucket, credentials()) == []


def test_a_dataset_replaced_on_a_store_counts_only_its_own_rows(
    ray_session, bucket, sample_root, capsys
):
    """Found probing: the replaced dataset's files stay on the store until the new one is whole,
    and its counts took them in (a 7-image test split that no longer existed)."""
    data = f"{bucket}/data/replaced"
    build = ["data", "build", "--source", "neu-seg", "--root", str(sample_root), "--out", data]
    assert main([*build, "--test-fraction", "0.4"]) == 0
    assert Manifest.load(data).counts["test"].total > 0
    assert main([*build, "--overwrite"]) == 0
    counts = {split: c.total for split, c in Manifest.load(data).counts.items()}
    assert counts == {"train": 42, "val": 15, "test": 0}
    assert read_split_table(data, "train").num_rows == 42
    assert not (Location.of(data) / "test").files(".parquet")
    assert "{'train': 42, 'val': 15, 'test': 0}" in capsys.readouterr().out


def test_encoder_weights_on_a_store_load_as_from_a_file(bucket):
    # A cluster without shared disk: every node reads the weights from the store.
    import torch

    from defectforge.segmentation.models import build_model

    state = build_model("unet", "resnet18", 3, 2).encoder.state_dict()
    saved = io.BytesIO()
    torch.save(state, saved)
    uri = f"{bucket}/weights/resnet18.pt"
    Location.of(uri).write_bytes(saved.getvalue())
    model = build_model("deeplabv3plus", "resnet18", 3, 2, encoder_weights=uri)
    assert torch.equal(
        model.encoder.state_dict()["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"]
    )
    with pytest.raises(DataError, match="resnet18.pth: encoder weights file not found"):
        build_model("unet", "resnet18", 3, 2, encoder_weights=f"{uri}h")


def test_publishing_on_a_store_counts_a_folder_only_once_its_record_is_there(bucket):
    final = f"{bucket}/published"
    with pytest.raises(RuntimeError), publish_dir(final) as staging:
        (staging / "part.bin").write_bytes(b"x")
        raise RuntimeError("the writer dies")
    assert not Location.of(final).children()  # a failed writer leaves nothing behind

    with publish_dir(final) as staging:
        (staging / "part.bin").write_bytes(b"first")
        with pytest.raises(DataError, match="another command is writing this folder now"):
            with publish_dir(final, overwrite=True):
                pass
    assert (Location.of(final) / "part.bin").read_bytes() == b"first"  # the first result stands
    assert OUTPUT_RECORD in Location.of(final).children()

    with pytest.raises(DataError, match="output folder already exists"):
        with publish_dir(final):
            pass
    with publish_dir(final, overwrite=True) as staging:
        (staging / "other.bin").write_bytes(b"second")
    assert Location.of(final).children() == sorted([OUTPUT_RECORD, "other.bin"])
    with pytest.raises(RuntimeError), publish_dir(final, overwrite=True) as staging:
        (staging / "third.bin").write_bytes(b"x")
        raise RuntimeError("the replacement dies")
    assert Location.of(final).children() == sorted([OUTPUT_RECORD, "other.bin"])  # still there

    foreign = Location.of(f"{bucket}/foreign")
    (foreign / "theirs.txt").write_text("not ours")
    for overwrite in (False, True):  # never advised to pass the flag that is then refused
        with pytest.raises(DataError, match="replaces only folders defectforge wrote"):
            with publish_dir(foreign.uri, overwrite=overwrite):
                pass
    assert (foreign / "theirs.txt").read_text() == "not ours"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("AWS_SECRET_ACCESS_KEY", "wrong", "the store refused the credentials"),
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:1", "the store cannot be reached"),
        (None, None, "the bucket nosuchbucket does not exist"),
    ],
)
def test_a_store_that_refuses_is_missing_or_unreachable_is_one_line(
    bucket, sample_root, variable, value, expected, monkeypatch, capsys
):
    if variable:
        monkeypatch.setenv(variable, value)
    target = f"{bucket}/refused" if variable else "s3://nosuchbucket/data"
    build = ["data", "build", "--source", "neu-seg", "--root", str(sample_root), "--out", target]
    assert main(build) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    err = lines[0]
    assert err.startswith(f"defectforge: error: {target}: ") and expected in err
    monkeypatch.undo()
    assert not Location.of(target).exists()  # nothing was written, no bucket made
    if variable is None:  # an input there is said to be missing as such, not "not a dataset"
        subset = ["data", "subset", "--data", target, "--train", "5", "--out", f"{bucket}/sub"]
        assert main(subset) == 2
        assert f"{target}: the bucket nosuchbucket does not exist" in capsys.readouterr().err


def test_a_key_granted_only_a_prefix_works_there_and_is_one_line_elsewhere(s3_server, monkeypatch):
    s3_server.make_bucket(PREFIX_GRANTED.split("/")[0])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", PREFIX_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PREFIX_SECRET)
    granted = f"s3://{PREFIX_GRANTED}/published"
    Location.of(granted).check_writable()
    with publish_dir(granted) as staging:
        (staging / "result.txt").write_text("kept")
    assert (Location.of(granted) / "result.txt").read_text() == "kept"
    elsewhere = f"s3://{PREFIX_GRANTED.split('/')[0]}/elsewhere"
    with pytest.raises(StorageError, match="refused the credentials; .* policy allows"):
        Location.of(elsewhere).check_writable()


def test_a_node_that_cannot_use_the_store_is_one_line_naming_it_and_the_location(
    ray_session, bucket
):
    @ray.remote(num_cpus=0, runtime_env={"env_vars": {"AWS_SECRET_ACCESS_KEY": "wrong"}})
    def check_from_nodes_with_a_wrong_key(root: str) -> None:
        check_storage_everywhere(root)  # its probe tasks inherit the wrong key

    check_storage_everywhere(f"{bucket}/checked")  # this session's nodes can
    with pytest.raises(StorageError) as refused:
        ray.get(check_from_nodes_with_a_wrong_key.remote(f"{bucket}/checked"))
    line = str(refused.value.cause if hasattr(refused.value, "cause") else refused.value)
    node = ray.util.get_node_ip_address()
    assert line == (
        f"storage_path = {bucket}/checked: the store refused the credentials (from node {node}); "
        "check "
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the node's role, or "
        "GOOGLE_APPLICATION_CREDENTIALS) and that their policy allows this location"
    )


def test_a_location_with_an_unknown_scheme_or_credentials_in_it_is_one_line(capsys):
    with pytest.raises(StorageError, match="unknown storage scheme; use a local path, s3://"):
        Location.of("ftp://host/data")
    out = ["--out", "s3://AKIAEXAMPLE:secret@bucket/data"]
    with pytest.raises(SystemExit) as refused:  # refused while the command line is read
        main(["data", "build", "--source", "neu-seg", "--root", "x", *out])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "s3://***: a location holding credentials" in err and "secret" not in err
    assert Location.of(Path("relative")).uri == str(Path("relative").resolve())


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("s3:/defects/data", "a store location missing a slash would be a local folder"),
        ("gs:bucket/data", "a store location missing a slash would be a local folder"),
        ("S3://defects/data", "write the scheme in lower case"),
        ("s3:///data", "no bucket named"),
        ("s3://defects//data", "an empty, '.' or '..' part"),
        ("s3://defects/a/../data", "an empty, '.' or '..' part"),
    ],
)
def test_a_mistyped_store_location_is_one_line_before_anything_is_written(
    given, problem, tmp_path, capsys, monkeypatch
):
    """Found probing: `--out s3:/defects/t1` wrote a local folder `s3:` and exited 0; `..` and
    `//` in a URI were "the store refused the credentials"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        main(["data", "build", "--source", "neu-seg", "--root", "x", "--out", given])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert f"{given}: {problem}" in err and len(error_lines(err)) == 1
    assert not list(tmp_path.iterdir())


def test_gan_runs_on_a_store_compare_into_a_store(bucket, tmp_path, capsys):
    runs = {}
    for name, swds in (("on", [(0, 200.0), (2, 150.0)]), ("off", [(0, 200.0), (2, 170.0)])):
        runs[name] = f"{bucket}/gan/{name}"
        Location.of(runs[name]).upload(fake_gan_run(tmp_path / name, swds))
    out = f"{bucket}/gan/comparison"
    assert main(["gan", "compare", runs["on"], runs["off"], "--kimg", "2", "--out", out]) == 0
    assert "| on | 150.0 | 150.0 (2) |" in capsys.readouterr().out
    published = Location.of(out)
    assert {"swd.png", "samples_kimg2.png", "comparison.json", OUTPUT_RECORD} <= set(
        published.children()
    )
    assert (published / "comparison.json").read_json()["runs"] == runs


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--model", "m", "--images", "{store}/images", "--out", "o"],
        ["data", "build", "--source", "folder", "--root", "{store}/raw", "--out", "o"],
        ["study", "run", "{store}/spec.yaml"],
    ],
    ids=["predict --images", "data build --root", "study run spec"],
)
def test_options_read_only_on_this_machine_refuse_a_store_in_one_line(argv, bucket, capsys):
    with pytest.raises(SystemExit) as refused:
        main([part.format(store=bucket) for part in argv])
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(error_lines(err)) == 1, err
    assert (
        f"{bucket}/" in err
        and "is on object storage" in err
        and "copy it to this machine first" in err
    )


def test_synthetic_sets_on_a_store_combine_into_a_store(sample_dataset, bucket, capsys):
    parts = [f"{bucket}/synthetic/cp-{seed}" for seed in (0, 1)]
    for seed, part in enumerate(parts):
        made = ["synth", "copy-paste", "--real", str(sample_dataset), "--count", "6"]
        assert main([*made, "--seed", str(seed), "--out", part]) == 0
    both = f"{bucket}/synthetic/both"
    combine = ["synth", "combine", "--sets", *parts, "--count-each", "4", "--out", both]
    assert main(combine) == 0
    assert "4 images from each of 2 sets" in capsys.readouterr().out
    manifest = Manifest.load(both)
    assert manifest.counts["train"].total == 8
    assert read_split_table(both, "train").num_rows == 8
    assert main(combine) == 2  # the publish rules hold on the store
    assert "output folder already exists" in capsys.readouterr().err

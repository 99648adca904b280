"""A real 3-node Ray cluster on this machine (`cluster up --workers 2`), a study submitted to it
through the Jobs API, its export from the client, and `cluster down`; a 2-node cluster whose
worker cannot see the study's storage, which the study refuses; plus the checks that need no
cluster (spec labels, shipped spec, wheel contents, token handling)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from cli_checks import can_unshare, error_lines
from s3server import credentials, objects_holding

from defectforge.cli import main
from defectforge.cluster import jobs
from defectforge.cluster.local import (
    WORKER_LABEL,
    LocalCluster,
    LocalClusterConfig,
    alive_nodes,
    free_port,
)
from defectforge.core.errors import ClusterError
from defectforge.studies.errors import SpecError
from defectforge.studies.spec import parse_spec


def cluster_spec(data: Path, storage: Path) -> dict:
    """Two trials at once, each worker asking for a worker label, so they must use two nodes."""
    return {
        "name": "on-cluster",
        "dataset": {"real": str(data)},
        "search_space": {"arch": ["unet", "fpn"], "epochs": 1, "batch_size": 4},
        "search": {"algorithm": "grid", "max_concurrent_trials": 2},
        "resources": {"cpus_per_trial": 1, "custom_per_worker": {WORKER_LABEL: 1}},
        "training": {"max_steps_per_epoch": 2, "crop_size": 64, "image_size": 64},
        "storage_path": str(storage),
        "final": {"seeds": 0},
    }


NAMESPACES = can_unshare("--mount")
needs_namespaces = pytest.mark.skipif(not NAMESPACES, reason="needs Linux mount namespaces (root)")


@pytest.fixture(scope="module")
def head_only(tmp_path_factory) -> Path | None:
    """A folder only the cluster's head sees (where mount namespaces allow), as on a cloud
    cluster whose nodes share no disk."""
    return tmp_path_factory.mktemp("head-only") if NAMESPACES else None


@pytest.fixture(scope="module")
def local_cluster(s3_server, head_only, tmp_path_factory):
    # After the S3 server: its nodes reach the bucket through the standard variables.
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    private = (str(head_only),) if head_only else ()
    state = cluster.up(
        LocalClusterConfig(workers=2, dashboard_port=free_port(), private_to_head=private)
    )
    yield cluster, state
    cluster.down()


def test_cluster_up_starts_labelled_nodes_behind_a_token(local_cluster):
    cluster, state = local_cluster
    nodes = alive_nodes(state["dashboard_url"])
    labels = [set(node["raylet"]["resourcesTotal"]) for node in nodes]
    assert len(nodes) == 3
    assert sum("defectforgeWorker" in names for names in labels) == 2  # the dashboard camelCases
    assert sum("defectforgeHead" in names for names in labels) == 1
    assert state["dashboard_url"].startswith("http://127.0.0.1:")
    with pytest.raises(ClusterError, match="still up"):
        cluster.up(LocalClusterConfig(workers=1, dashboard_port=free_port()))

    plain = urllib.request.Request(f"{state['dashboard_url']}/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(plain, timeout=10)
    assert refused.value.code == 401
    wrong = urllib.request.Request(plain.full_url, headers={"Authorization": "Bearer nope"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=10)
    assert refused.value.code == 403


@pytest.fixture(scope="module")
def submitted_pipeline(
    local_cluster, head_only, s3_server, sample_root, labeller, tmp_path_factory
):
    """A pipeline study submitted once through the Jobs API and waited for, with every output
    on object storage: a data stage from raw images only the head sees, a GAN of two workers
    whose images are labelled (by a labeller on the store) and mixed in, and two trials at once
    on two labelled nodes that share no folder with the head."""
    from defectforge.core.storage import Location

    _, state = local_cluster
    folder = tmp_path_factory.mktemp("submitted")
    bucket = s3_server.make_bucket("cluster-studies")
    raw = (head_only or folder) / "raw"
    shutil.copytree(sample_root, raw)
    (Location.of(bucket) / "labeller").upload(labeller)
    spec = cluster_spec(Path("unused"), Path("unused"))
    spec.pop("dataset")
    spec["storage_path"] = f"{bucket}/studies"
    spec["data"] = {"source": "neu-seg", "root": str(raw)}
    spec["gan"] = {"resolution": 32, "kimg": 0.032, "snapshot_kimg": 0.032, "workers": 2}
    spec["gan"]["metric_images"] = 16
    spec["generate"] = {"count": 16}
    spec["labeller"] = {"run": f"{bucket}/labeller"}
    spec["label"] = {"min_confidence": 0.0}
    spec["search_space"]["synthetic_ratio"] = 0.1
    spec_file = folder / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    address = state["dashboard_url"]
    done = subprocess.run(
        [sys.executable, "-m", "defectforge.cli", "submit", str(spec_file)]
        + ["--address", address, "--no-pip", "--wait"],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
    )
    job_id = done.stdout.split("submitted ")[1].split(";")[0]
    return {"address": address, "job": job_id, "bucket": bucket, "done": done}


def test_a_submitted_pipeline_runs_on_several_nodes_and_exports_from_the_client(
    submitted_pipeline, tmp_path, capsys
):
    from defectforge.core.storage import Location
    from defectforge.studies.results import TRIALS_FILE

    address, job_id = submitted_pipeline["address"], submitted_pipeline["job"]
    done, studies = (
        submitted_pipeline["done"],
        Location.of(submitted_pipeline["bucket"]) / "studies",
    )
    client = jobs.jobs_client(address)
    logs = client.get_job_logs(job_id)
    assert done.returncode == 0, logs[-3000:]
    assert f"{address}/#/jobs/{job_id}" in done.stdout
    assert f"job {job_id}: SUCCEEDED" in done.stdout
    root = studies / "on-cluster"
    trials = (root / TRIALS_FILE).read_json()
    assert {t["status"] for t in trials} == {"finished"}
    assert len({node for t in trials for node in t["nodes"]}) == 2
    gan = next(name for name in (studies / "stages").children() if name.startswith("gan-"))
    assert len((studies / "stages" / gan / "metrics.json").read_json()["nodes"]) == 2

    # Credentials reach the job only through the nodes' environment: none in what it wrote,
    # printed or recorded about itself.
    info = client.get_job_info(job_id)
    recorded = json.dumps([info.entrypoint, info.metadata, info.runtime_env], default=str)
    assert not any(secret in logs + done.stdout + recorded for secret in credentials())
    assert objects_holding(submitted_pipeline["bucket"], credentials()) == []

    assert main(["jobs", "list", "--address", address]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["jobs", "status", job_id, "--address", address]) == 0
    status, where = capsys.readouterr().out.strip().splitlines()
    assert status == "SUCCEEDED" and where.startswith("[stage 5/5] label ")

    # Exported from the client, out of the bucket onto its own disk, and predicting there (an
    # export onto a bucket: test_pipeline's study exports itself to one).
    export, out = tmp_path / "export", tmp_path / "predicted"
    images = Path(__file__).resolve().parent.parent / "datasets/sample/neu-seg/images/val"
    assert main(["study", "export", root.uri, "--out", str(export)]) == 0
    assert (
        main(["predict", "--model", str(export), "--images", str(images), "--out", str(out)]) == 0
    )
    assert len((out / "predictions.csv").read_text().splitlines()) == 16


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Where the browser test leaves its screenshots (the README's come from there); else tmp_path.
SCREENSHOTS_ENV = "DEFECTFORGE_SCREENSHOTS"


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (Debian: apt-get install -y chromium)")
def test_the_dashboard_shows_the_job_its_stages_and_its_trials(submitted_pipeline, tmp_path):
    """In a real headless Chromium: the dashboard asks for the token, lists the submitted job,
    and its page shows the job's log with the stages and the trials by their names."""
    sync_api = pytest.importorskip("playwright.sync_api")
    address, job_id = submitted_pipeline["address"], submitted_pipeline["job"]
    token = jobs.auth_headers(None)["Authorization"].split(" ", 1)[1]
    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{address}/#/jobs")
            page.get_by_placeholder("Enter your authentication token").fill(token)
            page.get_by_role("button", name="Submit").click()
            row = page.get_by_role("row").filter(has_text=job_id)
            row.get_by_text("SUCCEEDED").wait_for(timeout=60_000)
            assert row.get_by_role("cell").nth(1).inner_text().strip() == "on-cluster"  # Name
            page.screenshot(path=str(shots / "dashboard-jobs.png"))

            page.goto(f"{address}/#/jobs/{job_id}")
            # The log view draws only the lines in sight; its keyword filter brings them there.
            keyword = page.get_by_label("Keyword")
            try:
                keyword.fill("] gan ")
                page.get_by_text(re.compile(r"\[stage \d+/\d+\] gan ")).first.wait_for(
                    timeout=60_000
                )
                keyword.fill("_arch=")
                page.get_by_text("_arch=unet").first.wait_for(timeout=60_000)
                page.get_by_text("_arch=fpn").first.wait_for(timeout=60_000)
            finally:
                page.screenshot(path=str(shots / "dashboard-job.png"), full_page=True)
        finally:
            browser.close()
    assert (shots / "dashboard-jobs.png").stat().st_size > 20_000


def test_a_stage_command_alone_runs_on_the_cluster_with_address(local_cluster, tmp_path):
    """`defectforge --address ADDR COMMAND`: the command's Ray work joins the running cluster
    instead of starting a Ray of its own."""
    _, state = local_cluster
    sample = Path(__file__).resolve().parent.parent / "datasets" / "sample" / "neu-seg"
    out = tmp_path / "built"
    done = subprocess.run(
        [sys.executable, "-m", "defectforge.cli", "--address", state["address"]]
        + ["data", "build", "--source", "neu-seg", "--root", str(sample), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "manifest.json").is_file()
    # It ran as a driver of the cluster (listed there), not on a Ray of its own.
    drivers = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(
                f"{state['dashboard_url']}/api/jobs/", headers=jobs.auth_headers(None)
            ),
            timeout=10,
        ).read()
    )
    assert any("data build" in (job.get("entrypoint") or "") for job in drivers)


def test_joining_the_cluster_without_its_token_is_one_line_at_once(
    local_cluster, sample_dataset, tmp_path
):
    _, state = local_cluster
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(cluster_spec(sample_dataset, tmp_path / "studies")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), NO_ALBUMENTATIONS_UPDATE="1")  # no ~/.ray/auth_token here
    command = [sys.executable, "-m", "defectforge.cli", "study", "run", str(spec_file)]
    done = subprocess.run(
        [*command, "--address", state["address"]],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert error_lines(done.stderr)[-1] == (
        f"defectforge: error: {state['address']}: the cluster wants its auth token and none was "
        "found here; set RAY_AUTH_TOKEN, point RAY_AUTH_TOKEN_PATH at a copy of the cluster's "
        "token file, or copy it to ~/.ray/auth_token (readable by you alone)"
    )
    assert not (tmp_path / "studies").exists()


@needs_namespaces
def test_a_storage_path_some_nodes_cannot_see_is_refused(
    local_cluster, head_only, sample_dataset, tmp_path, capsys
):
    _, state = local_cluster
    storage = head_only / "refused"  # the workers see nothing there
    storage.mkdir()
    spec = cluster_spec(sample_dataset, storage)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    address = state["dashboard_url"]

    code = main(["submit", str(tmp_path / "spec.yaml"), "--address", address, "--no-pip", "--wait"])

    job_id = capsys.readouterr().out.split("submitted ")[1].split(";")[0]
    logs = jobs.jobs_client(address).get_job_logs(job_id)
    assert code == 1, logs[-2000:]
    assert f"storage_path {storage / 'on-cluster'}: not visible from 2 of 3 nodes" in logs
    assert not list(storage.iterdir())  # refused before anything was written

    run = storage / "seg-run"
    done = subprocess.run(
        [sys.executable, "-m", "defectforge.cli", "--address", state["address"]]
        + ["seg", "train", "--data", str(sample_dataset), "--out", str(run)],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"--out {run}: not visible from 2 of 3 nodes" in error_lines(done.stderr)[-1]
    assert not list(storage.iterdir())


def test_cluster_down_stops_every_process_it_started(local_cluster):
    cluster, state = local_cluster
    leaders = [node["pid"] for node in state["nodes"]]

    stopped = cluster.down()

    assert stopped == ["worker-2", "worker-1", "head"]
    for pgid in leaders:
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
    assert cluster.state() is None and not Path(state["temp_dir"]).exists()
    assert cluster.down() == []


# --- without a cluster ---------------------------------------------------------------------


def test_custom_resources_in_a_spec_are_checked(tmp_path):
    spec = cluster_spec(tmp_path, tmp_path)
    assert parse_spec(spec).resources.custom_per_worker == {WORKER_LABEL: 1}
    for bad in ({"CPU": 1}, {"x": 0}):
        spec["resources"]["custom_per_worker"] = bad
        with pytest.raises(SpecError, match="custom resource names .* to positive amounts"):
            parse_spec(spec)


def test_the_shipped_spec_has_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = cluster_spec(Path("data/real"), Path("runs/studies"))
    spec["search"].update(
        algorithm="optuna", optuna_storage="runs/study.db"
    )  # only Optuna keeps one
    spec["dataset"]["copy_paste"] = "data/copy-paste"
    spec["dataset"]["synthetic"] = "s3://bucket/synthetic/"
    spec["search_space"]["synthetic_ratio"] = 0.2
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))

    shipped = yaml.safe_load(jobs.shipped_spec(tmp_path / "spec.yaml"))

    assert shipped["dataset"]["real"] == str(tmp_path / "data/real")
    assert shipped["dataset"]["copy_paste"] == str(tmp_path / "data/copy-paste")
    assert shipped["dataset"]["synthetic"] == "s3://bucket/synthetic"  # a URI stays one
    assert shipped["storage_path"] == str(tmp_path / "runs/studies")
    assert shipped["search"]["optuna_storage"] == str(tmp_path / "runs/study.db")
    spec["search_space"]["arch"] = "no-such-net"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match="arch"):
        jobs.shipped_spec(tmp_path / "bad.yaml")


def test_the_job_carries_our_code_only(tmp_path):
    wheel = jobs.build_wheel(tmp_path / "wheel")
    package = jobs.unpacked_package(wheel, tmp_path / "package")

    assert (package / "cluster" / "jobs.py").is_file()
    assert (package / "cli" / "__main__.py").is_file()
    assert (package / "core" / "errors.py").is_file()
    assert not (tmp_path / "package" / "ray").exists()  # no dependencies ride along
    assert not any(line.lower().startswith("ray") for line in jobs.requirements())
    assert any(line.startswith("torch") for line in jobs.requirements())


def test_the_jobs_commands_need_a_token_and_a_dashboard_url(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert main(["jobs", "list", "--address", "http://127.0.0.1:1"]) == 2
    assert "no Ray auth token" in capsys.readouterr().err
    assert main(["jobs", "list", "--address", "127.0.0.1:8265"]) == 2
    assert "give the dashboard URL" in capsys.readouterr().err


def test_cluster_up_refuses_bad_settings_before_starting_anything(tmp_path, capsys):
    state = str(tmp_path / "cluster")
    assert main(["cluster", "up", "--workers", "0", "--state", state]) == 2
    assert "workers = 0: must be >= 1 (a cluster needs a worker)" in capsys.readouterr().err
    missing = str(tmp_path / "nope")
    assert main(["cluster", "up", "--hide-from-last-worker", missing, "--state", state]) == 2
    assert (
        f"hide_from_last_worker = '{missing}': must be an existing folder"
        in capsys.readouterr().err
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = str(taken.getsockname()[1])
        assert main(["cluster", "up", "--dashboard-port", port, "--state", state]) == 2
    assert f"--dashboard-port {port}: port in use" in capsys.readouterr().err
    assert not (tmp_path / "cluster").exists()

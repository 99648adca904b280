"""Studies as Ray Jobs: submit a spec to a cluster's Jobs API, and list, follow and stop jobs.

The job's runtime environment carries this project as a wheel built from the working tree
(unpacked, in ``py_modules``), the spec, and unless told otherwise the project's pip dependencies
(Ray builds a virtualenv over the node's own packages for them: seconds where they are
installed, minutes where they must be downloaded; nodes whose image has them can skip it). The
Ray auth token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ``~/.ray/auth_token``, as Ray
reads it; it is sent as a header, never printed or put on a command line, and a warning says
so when it would cross the network unencrypted.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.parse
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import yaml

from defectforge.cluster.auth import auth_headers, default_token_path
from defectforge.core.errors import ClusterError, ConfigError
from defectforge.core.files import declared_requirements, scratch_folder
from defectforge.core.storage import absolute_location
from defectforge.studies.spec import load_spec
from defectforge.studies.spec_schema import DatasetSpec

PROJECT = "defectforge"
JOB_SPEC = "spec.yaml"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Ray must match the cluster's own, so it is never reinstalled into a job's environment.
NOT_SHIPPED = ("ray",)
POLL_SECONDS = 2.0
NOT_IN_WHEEL = (
    *(".git", "runs", "build", "*.egg-info", "__pycache__", ".*cache", ".gpu"),
    *("docs", "tests", "benchmarks"),
)
_warned_token_in_clear = False


def jobs_client(address: str, token_file: str | None = None):
    """A Jobs SDK client for ``address`` (http://HOST:8265) that sends the Ray token."""
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise ClusterError(f"--address {address}: give the dashboard URL, e.g. http://HOST:8265")
    headers = auth_headers(token_file)
    if not headers:
        raise ClusterError(
            f"no Ray auth token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, pass --token-file, "
            f"or copy the cluster's token to {default_token_path()}"
        )
    warn_if_token_in_clear(address)
    # Sent as our own header: Ray adds its token only if RAY_AUTH_MODE was set before it loaded.
    return JobSubmissionClient(address, headers=headers)


def warn_if_token_in_clear(address: str) -> None:
    """Warn once per process, on stderr, when ``address`` is plain http to another machine: the
    token rides in a header anyone on the path can read and reuse to run code on the cluster."""
    global _warned_token_in_clear
    parts = urllib.parse.urlsplit(address)
    if _warned_token_in_clear or parts.scheme != "http" or _is_loopback(parts.hostname or ""):
        return
    _warned_token_in_clear = True
    print(
        f"defectforge: warning: the Ray token travels unencrypted to {parts.hostname} (plain "
        "http); use https, or an SSH tunnel (`ray dashboard CLUSTER.yaml` or `ssh -L "
        "8265:127.0.0.1:8265 HEAD`) and --address http://127.0.0.1:8265",
        file=sys.stderr,
    )


def _is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: traffic that never leaves this machine."""
    if host == "localhost":  # urlsplit gives the host name in lower case
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def project_root() -> Path:
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        raise ConfigError(
            f"{root}: not a source checkout, so no wheel can be built here; pass --wheel "
            "with a defectforge wheel (pip wheel --no-deps <checkout>)"
        )
    return root


def build_wheel(out: Path) -> Path:
    """The project as a wheel built from a copy of its working tree (dependencies not included):
    a build in place would leave build/ behind, and files deleted since an earlier build there
    would ride along in the wheel."""
    source = out / "source"
    shutil.copytree(project_root(), source, ignore=shutil.ignore_patterns(*NOT_IN_WHEEL))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out)]
    if _has_setuptools():
        command.append("--no-build-isolation")  # no registry needed
    done = subprocess.run([*command, str(source)], capture_output=True, text=True, check=False)
    wheels = sorted(out.glob(f"{PROJECT}-*.whl"))
    if done.returncode or not wheels:
        raise RuntimeError(f"building the {PROJECT} wheel failed: {done.stderr.strip()[-500:]}")
    return wheels[-1]


def unpacked_package(wheel: Path, out: Path) -> Path:
    """The ``defectforge`` package folder from a wheel, as the job's ``py_modules`` entry.

    Ray installs a wheel given in py_modules with ``pip install --target`` and so with all its
    dependencies (torch, Ray itself) into the job's folder; the unpacked folder ships only our
    code, and Ray names its upload by content, so a changed tree is never served from cache.
    """
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(out)
    package = out / PROJECT
    if not package.is_dir():
        raise ConfigError(f"{wheel}: no {PROJECT}/ package inside; is it a defectforge wheel?")
    return package


def _has_setuptools() -> bool:
    try:
        import setuptools  # noqa: F401
    except ImportError:
        return False
    return True


# The extras a job's pip environment installs beside the package's own requirements.
JOB_EXTRAS = ("train", "cpu")


def requirements(extras: tuple[str, ...] = JOB_EXTRAS) -> list[str]:
    """The project's runtime requirements with ``extras`` (by default the training stack and
    the CPU ONNX runtime: what a job's stages and its export check import), less Ray itself."""
    return [
        str(requirement)
        for requirement in declared_requirements(extras)
        if requirement.name.lower() not in NOT_SHIPPED
    ]


def shipped_spec(spec_path: str | Path) -> str:
    """The spec as the cluster gets it: relative paths made absolute against this folder, since
    the job runs in a temporary folder of its own. On a remote cluster such paths must be ones
    every node mounts (or s3:// / gs:// URIs); the study checks that when it starts."""
    spec = load_spec(spec_path)  # refuse a malformed spec here, before anything is uploaded
    data = yaml.safe_load(Path(spec_path).read_text())
    data["storage_path"] = absolute_location(spec.storage_path)
    datasets = [("dataset", field.name) for field in DatasetSpec.options()]
    runs = [(stage, "run") for stage in ("labeller", "gan", "mask_gan")]
    for section, key in (*datasets, ("data", "root"), *runs):
        values = data.get(section) or {}
        if values.get(key):
            values[key] = absolute_location(values[key])
    search = data.get("search") or {}
    if search.get("optuna_storage"):
        search["optuna_storage"] = absolute_location(search["optuna_storage"])
    return yaml.safe_dump(data, sort_keys=False)


def submit_study(
    client,
    text: str,
    name: str | None = None,
    wheel: str | None = None,
    pip_dependencies: bool = True,
) -> str:
    """Submit ``study run`` for a spec (as `shipped_spec` gives it) as a Ray Job; returns the
    job's submission id."""
    spec = yaml.safe_load(text)
    spec_name = name or spec["name"]
    # A spec that tracks its trials in MLflow needs mlflow beside the driver.
    extras = JOB_EXTRAS + (("mlflow",) if (spec.get("tracking") or {}).get("mlflow") else ())
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    with scratch_folder("job") as tmp:
        job_dir = Path(tmp) / "job"
        job_dir.mkdir()
        (job_dir / JOB_SPEC).write_text(text)
        wheel_path = Path(wheel) if wheel else build_wheel(Path(tmp) / "wheel")
        if not wheel_path.is_file():
            raise ConfigError(f"--wheel {wheel}: no such file; build one with pip wheel")
        package = unpacked_package(wheel_path, Path(tmp) / "package")
        runtime_env = {
            "working_dir": str(job_dir),
            "py_modules": [str(package)],
            "env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"},
        }
        if pip_dependencies:
            runtime_env["pip"] = {"packages": requirements(extras), "pip_check": False}
        return client.submit_job(
            entrypoint=job_entrypoint(name),
            runtime_env=runtime_env,
            submission_id=f"{PROJECT}-{id_part(spec_name)}-{stamp}",
            metadata={
                "job_name": name or spec_name,  # the dashboard's Name column
                "study": spec_name,
                "spec_sha256": hashlib.sha256(text.encode()).hexdigest(),
            },
        )


def id_part(name: str) -> str:
    """``name`` as part of a job id: the Jobs API puts the id in URL paths, where a `/`, `?`,
    `#` or space would make the job unreachable (`jobs stop` among others)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "study"


def job_entrypoint(name: str | None = None) -> str:
    """The job's command line. Ray runs it through a shell, so every part is quoted: a study
    name with a space or `;` stays one argument instead of breaking or extending the command."""
    argv = ["python", "-m", f"{PROJECT}.cli", "study", "run", JOB_SPEC]
    argv += ["--address", "auto"]
    if name:
        argv += ["--name", name]
    return shlex.join(argv)


def job_url(address: str, job_id: str) -> str:
    return f"{address.rstrip('/')}/#/jobs/{job_id}"


def wait_for(client, job_id: str, timeout_s: float | None = None) -> str:
    """Poll until the job ends; returns its final status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id}: still {status} after {timeout_s:.0f} s")
        time.sleep(POLL_SECONDS)


def follow(client, job_id: str, out=sys.stdout) -> str:
    """Stream the job's logs until it ends; returns its final status."""

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(stream())
    return wait_for(client, job_id)


STAGE_LINE = re.compile(r"\[stage \d+/\d+\] .*")
# A study's line for a trial's epoch (trainables.study_progress): "<trial>: epoch 2/8: ..."
TRIAL_LINE = re.compile(r"^(\S+): (epoch \d+/\d+):", re.MULTILINE)
# A progress bar's text as tqdm redraws it: "<what>: 42%|####  | 3/7 [...]"
BAR = re.compile(r"(\w[\w ]*): +\d+%\|[^|]*\| *([\d.]+/[\d.]+) \[[^]]*\]")


def job_progress(logs: str) -> str:
    """Where a study job is, from its log: the latest stage line, and the latest progress bar
    (epochs, kimg, images labelled), and the latest trial epoch a study printed."""
    parts = []
    stages = STAGE_LINE.findall(logs)
    if stages:
        parts.append(stages[-1])
    bars = BAR.findall(logs)
    if bars:
        what, done = bars[-1]
        parts.append(f"{what} {done}")
    trials = TRIAL_LINE.findall(logs)
    if trials:
        name, epoch = trials[-1]
        parts.append(f"trial {name} {epoch}")
    return "; ".join(parts)


def job_rows(client) -> list[dict]:
    """Our jobs and any others on the cluster, newest first."""
    rows = []
    for job in client.list_jobs():
        rows.append(
            {
                "id": job.submission_id or job.job_id,
                "status": str(job.status.value),
                "study": (job.metadata or {}).get("study", ""),
                "started": _time(job.start_time),
                "entrypoint": job.entrypoint,
            }
        )
    return sorted(rows, key=lambda row: row["started"], reverse=True)


def _time(milliseconds: int | None) -> str:
    if not milliseconds:
        return ""
    moment = datetime.fromtimestamp(milliseconds / 1000, tz=timezone.utc)
    return moment.isoformat(timespec="seconds")

"""The cluster code's safety checks, none of which needs a cluster: the token file kept private,
the job's command line quoted, a warning before the token crosses the network in clear, the
head's address waited for, and user-fixable problems raised as one-line ClusterErrors."""

import shlex
import socket
import stat
import threading
import time
import zipfile
from pathlib import Path

import pytest
from cli_checks import error_lines

from defectforge.cluster import auth, jobs, local
from defectforge.core.errors import ClusterError, ConfigError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A home folder of our own (Path.home() reads HOME), no token given any other way."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert auth.default_token_path() == tmp_path / ".ray" / "auth_token"
    return tmp_path


def _write_open_token(home: Path) -> Path:
    """The token as Ray leaves it: 0644 in a 0755 folder."""
    folder = home / ".ray"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o755)
    token = folder / "auth_token"
    token.write_text("not-a-real-token\n")
    token.chmod(0o644)
    return token


# --- the token file ------------------------------------------------------------------------


@pytest.mark.parametrize("locate", [auth.auth_environment, auth.auth_headers])
def test_an_open_token_file_is_made_private_where_it_is_found(home, locate):
    token = _write_open_token(home)

    locate()  # `cluster up` calls auth_environment; `submit` and `jobs` call auth_headers

    assert _mode(token) == 0o600 and _mode(token.parent) == 0o700
    assert token.read_text() == "not-a-real-token\n"  # secured, not rewritten


def test_a_generated_token_file_is_made_private(home, monkeypatch):
    calls = []

    def ray_generates(command, **kwargs):
        # What `ray get-auth-token --generate` does without the umask we ask for.
        calls.append((command, kwargs))
        _write_open_token(home)

    monkeypatch.setattr(auth.subprocess, "run", ray_generates)

    env = auth.auth_environment()

    token = auth.default_token_path()
    assert calls[0][0][1:] == ["get-auth-token", "--generate"]
    assert calls[0][1]["umask"] == 0o077  # private from its first byte, not only afterwards
    assert _mode(token) == 0o600 and _mode(token.parent) == 0o700
    assert auth.read_token(env) == "not-a-real-token"


def test_a_private_token_file_and_other_token_files_are_left_as_they_are(home, monkeypatch):
    token = _write_open_token(home)
    token.parent.chmod(0o700)
    token.chmod(0o400)
    elsewhere = home / "cluster-token"
    elsewhere.write_text("given-token")
    elsewhere.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(elsewhere))

    auth.auth_headers()
    auth.secure_token_file(token)

    assert _mode(token) == 0o400 and _mode(elsewhere) == 0o644


# --- the job's command line ----------------------------------------------------------------

COMMAND = ["python", "-m", "defectforge.cli", "study", "run", jobs.JOB_SPEC]


def test_the_job_entrypoint_keeps_a_hostile_name_one_argument():
    name = "my study; rm -rf x"

    assert shlex.split(jobs.job_entrypoint(name)) == [*COMMAND, "--address", "auto", "--name", name]
    assert shlex.split(jobs.job_entrypoint()) == [*COMMAND, "--address", "auto"]


class RecordingClient:
    """Stands in for the Jobs SDK client: keeps what would be submitted."""

    def __init__(self):
        self.submitted = {}

    def submit_job(self, **kwargs) -> str:
        self.submitted = kwargs
        return kwargs["submission_id"]


def test_submit_study_sends_the_quoted_entrypoint(tmp_path):
    wheel = tmp_path / "defectforge-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("defectforge/__init__.py", "")
    client = RecordingClient()

    jobs.submit_study(client, "name: spec-name\n", "a b$(id)", str(wheel), pip_dependencies=False)

    argv = shlex.split(client.submitted["entrypoint"])
    assert argv[-2:] == ["--name", "a b$(id)"] and argv[:-2] == [*COMMAND, "--address", "auto"]


# --- the token over plain http -------------------------------------------------------------


@pytest.fixture
def fresh_warning(monkeypatch):
    """This process has not warned yet, whatever earlier tests did."""
    monkeypatch.setattr(jobs, "_warned_token_in_clear", False)


def test_plain_http_to_another_machine_warns_once(fresh_warning, capsys):
    jobs.warn_if_token_in_clear("http://10.1.2.3:8265")
    jobs.warn_if_token_in_clear("http://10.1.2.3:8265")

    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1 and captured.out == ""
    assert "unencrypted" in lines[0] and "10.1.2.3" in lines[0]
    assert "https" in lines[0] and "ray dashboard" in lines[0] and "ssh -L" in lines[0]


@pytest.mark.parametrize(
    "address",
    [
        "http://127.0.0.1:8265",
        "http://127.5.6.7:8265",
        "http://localhost:8265",
        "http://LOCALHOST:8265/",
        "http://[::1]:8265",
        "https://host:8265",
        "https://10.1.2.3:8265",
    ],
)
def test_loopback_or_https_addresses_do_not_warn(fresh_warning, capsys, address):
    jobs.warn_if_token_in_clear(address)

    assert error_lines(capsys.readouterr().err) == []


def test_jobs_client_warns_before_it_connects(fresh_warning, monkeypatch, capsys):
    import ray.job_submission

    connected = []

    def unreachable(address, headers):
        connected.append((address, headers))
        raise ConnectionError(f"{address}: unreachable")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", unreachable)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-a-real-token")

    with pytest.raises(ConnectionError):
        jobs.jobs_client("http://10.1.2.3:8265")

    assert "unencrypted" in capsys.readouterr().err
    assert connected == [("http://10.1.2.3:8265", {"Authorization": "Bearer not-a-real-token"})]


# --- the head's address --------------------------------------------------------------------


def test_the_head_address_is_waited_for(tmp_path):
    address_file = tmp_path / "ray_current_cluster"
    address_file.touch()  # Ray opens the file before it writes to it
    writer = threading.Timer(0.3, address_file.write_text, ["10.0.0.5:6379"])
    started = time.monotonic()
    writer.start()
    try:
        address = local._head_address(str(tmp_path), "head.log", timeout_s=10)
    finally:
        writer.join()

    assert address == "10.0.0.5:6379"
    assert 0.25 < time.monotonic() - started < 5


def test_a_head_address_that_never_comes_names_the_head_log(tmp_path):
    started = time.monotonic()
    with pytest.raises(
        ClusterError, match=r"no address in .*ray_current_cluster.*see /x/head\.log"
    ):
        local._head_address(str(tmp_path), "/x/head.log", timeout_s=0.3)
    assert time.monotonic() - started < 5


# --- one-line user errors ------------------------------------------------------------------


def test_user_fixable_cluster_problems_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="workers = 0: must be >= 1"):
        local.LocalClusterConfig(workers=0)
    with socket.socket() as taken:
        taken.bind((local.HOST, 0))
        port = taken.getsockname()[1]
        with pytest.raises(ClusterError, match=f"--dashboard-port {port}: port in use"):
            local._check_port_free(port, "--dashboard-port")
    with pytest.raises(ClusterError, match="give the dashboard URL"):
        jobs.jobs_client("10.1.2.3:8265")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ClusterError, match="no Ray auth token"):
        jobs.jobs_client("https://host:8265")

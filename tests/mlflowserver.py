"""A real MLflow tracking server for the tests (`mlflow server`, from the mlflow package), on
127.0.0.1 with a SQLite store and its own artifact folder, stopped by its process group (it
runs its web workers as children)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

START_SECONDS = 120


def _free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MlflowServer:
    process: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_mlflow_server(folder: Path) -> MlflowServer:
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = folder / "mlflow.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = MlflowServer(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as answer:  # noqa: S310
                if answer.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"mlflow server did not answer on {server.url}; see {log}")


def only_run(url: str, experiment: str):
    """The one MLflow run of ``experiment`` (an assertion fails if there are others or none)."""
    import mlflow

    client = mlflow.MlflowClient(url)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    (run,) = client.search_runs([found.experiment_id])
    return client, run


def artifact_names(client, run_id: str, folder: str = "") -> set[str]:
    return {item.path for item in client.list_artifacts(run_id, folder or None)}

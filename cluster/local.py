"""A real multi-node Ray cluster on one machine, for development and tests.

``up`` starts a head and N worker nodes, each its own ``ray start --block`` process in a process
group of its own, with its own CPUs and a custom resource label (``defectforge_head``,
``defectforge_worker`` and ``defectforge_worker_<i>``). Token authentication is on for every
port, with Ray's default token file kept private to this user; the dashboard and Jobs API bind
to 127.0.0.1 only. The cluster keeps its Ray files under a temp folder of its own, so
``ray.init()`` elsewhere on the machine does not join it by accident. ``down`` stops only the
process groups ``up`` recorded in the state file, never processes found by name.

A cluster that is up is listed in this user's registry (``registry_folder``): ``--address auto``
joins only a cluster found there whose recorded head still runs (``own_cluster_addresses``),
never another Ray instance on the machine, such as another user's job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from defectforge.cluster.auth import auth_environment, auth_headers, ray_executable
from defectforge.core.config import TypedConfig, option
from defectforge.core.errors import ClusterError

STATE_FILE = "cluster.json"
HOST = "127.0.0.1"
HEAD_LABEL, WORKER_LABEL = "defectforge_head", "defectforge_worker"


@dataclass(frozen=True)
class LocalClusterConfig(TypedConfig):
    kind = "local cluster config"

    workers: int = option(2, "worker nodes", lambda v: v >= 1, ">= 1 (a cluster needs a worker)")
    cpus_per_worker: int = option(1, "CPUs each worker node offers", lambda v: v >= 1, ">= 1")
    head_cpus: int = option(1, "CPUs the head node offers", lambda v: v >= 0, ">= 0")
    object_store_mib: int = option(
        512, "object store per node", lambda v: v >= 80, ">= 80 (Ray's minimum)"
    )
    dashboard_port: int = option(
        8265, "dashboard and Jobs API port on 127.0.0.1", lambda v: 0 < v < 65536, "a TCP port"
    )
    start_timeout_s: float = option(120.0, cli=False)
    # Linux, as root: the last worker sees an empty folder here (a tmpfs over it, in a mount
    # namespace of its own), as a machine without the shared mount would; to try storage checks.
    # Linux, as root: folders only the head sees; every worker sees them empty (tmpfs mounts in
    # its own mount namespace), as on a cloud cluster whose nodes share no disk.
    private_to_head: tuple[str, ...] = option(
        (),
        "Linux, root: comma-separated folders only the head node sees (every worker sees them "
        "empty), like a cluster whose nodes share no disk: try object storage on one machine",
        lambda folders: all(Path(folder).is_dir() for folder in folders),
        "existing folders",
        metavar="FOLDER,...",
    )
    hide_from_last_worker: str = option(
        "",
        "Linux, root: the last worker sees FOLDER empty, like a node without a shared mount",
        lambda folder: Path(folder).is_dir(),
        "an existing folder",
        metavar="FOLDER",
    )


@dataclass(frozen=True)
class NodeProcess:
    role: str  # "head" or "worker-<i>"
    pid: int  # also the process group id: each node is a session leader
    started: str  # the leader's start time, so a reused pid is never mistaken for ours
    log: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def registry_folder() -> Path:
    """Where this user's clusters are listed while they are up, one file per state folder."""
    state_home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state_home) / "defectforge" / "clusters"


def _registry_entry(state_dir: Path) -> Path:
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
    return registry_folder() / f"{digest}.json"


def own_cluster_addresses() -> dict[str, Path]:
    """The GCS address of every cluster this user's ``cluster up`` started that is up now, with
    its state folder. A listed cluster counts only while its recorded head process (pid and
    start time) runs."""
    found = {}
    for entry in sorted(registry_folder().glob("*.json")):
        try:
            cluster = LocalCluster(json.loads(entry.read_text())["state"])
            state = cluster.state() or {}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an entry or state being written or removed meanwhile
        if state.get("address") and "head" in {node.role for node in cluster.running()}:
            found[state["address"]] = cluster.state_dir
    return found


def _check_port_free(port: int, flag: str) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            raise ClusterError(f"{flag} {port}: port in use; pass another one") from None


def _start_time(pid: int) -> str | None:
    """The process's start time as ``ps`` prints it, or None if no such process."""
    out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True)
    return out.stdout.strip() or None


def _group_alive(pgid: int) -> bool:
    _reap(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalCluster:
    """The cluster whose state lives in ``state_dir`` (pids, ports, logs)."""

    def __init__(self, state_dir: str | Path):
        self.state_dir = Path(state_dir)
        self.state_path = self.state_dir / STATE_FILE

    # --- state -------------------------------------------------------------------------------

    def state(self) -> dict | None:
        if not self.state_path.exists():
            return None
        return json.loads(self.state_path.read_text())

    def _write_state(self, state: dict) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        partial = self.state_path.with_suffix(".json.partial")
        partial.write_text(json.dumps(state, indent=1))
        partial.replace(self.state_path)

    def _nodes(self) -> list[NodeProcess]:
        state = self.state() or {}
        return [NodeProcess(**node) for node in state.get("nodes", [])]

    def running(self) -> list[NodeProcess]:
        return [node for node in self._nodes() if self._ours_and_alive(node)]

    @staticmethod
    def _ours_and_alive(node: NodeProcess) -> bool:
        leader_start = _start_time(node.pid)
        if leader_start is not None and leader_start != node.started:
            return False  # the pid now belongs to someone else
        # A dead leader's pid cannot be reused while its group still has members.
        return _group_alive(node.pid)

    # --- up ----------------------------------------------------------------------------------

    def up(self, cfg: LocalClusterConfig) -> dict:
        if self.running():
            raise ClusterError(
                f"{self.state_path}: a cluster started from here is still up; "
                f"`defectforge cluster down --state {self.state_dir}` first"
            )
        # A development cluster serves no traffic worth draining for Ray's default 30 s on stop.
        env = {**auth_environment(), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5"}
        _check_port_free(cfg.dashboard_port, "--dashboard-port")
        gcs_port = free_port()
        temp_dir = tempfile.mkdtemp(prefix="dfray-", dir="/tmp")  # short: Ray's socket paths
        state = {
            "address": "",
            "dashboard_url": f"http://{HOST}:{cfg.dashboard_port}",
            "temp_dir": temp_dir,
            "config": asdict(cfg),
            "nodes": [],
        }
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            head = self._start_node(
                "head",
                [
                    "--head",
                    "--port",
                    str(gcs_port),
                    "--temp-dir",
                    temp_dir,
                    "--dashboard-host",
                    HOST,
                    "--dashboard-port",
                    str(cfg.dashboard_port),
                    "--ray-client-server-port",
                    str(free_port()),
                    "--num-cpus",
                    str(cfg.head_cpus),
                    "--resources",
                    json.dumps({HEAD_LABEL: 1}),
                ],
                cfg,
                env,
            )
            state["nodes"].append(asdict(head))
            self._write_state(state)
            self._wait_for_nodes(state, 1, cfg.start_timeout_s)
            state["address"] = _head_address(temp_dir, head.log, cfg.start_timeout_s)
            self._write_state(state)
            for i in range(1, cfg.workers + 1):
                labels = {WORKER_LABEL: 1, f"{WORKER_LABEL}_{i}": 1}
                worker = self._start_node(
                    f"worker-{i}",
                    [
                        "--address",
                        state["address"],
                        "--num-cpus",
                        str(cfg.cpus_per_worker),
                        "--resources",
                        json.dumps(labels),
                        # Nodes sharing one runtime_resources folder delete each other's job
                        # files (working_dir, py_modules) when their own workers finish.
                        "--temp-dir",
                        f"{temp_dir}/w{i}",
                    ],
                    cfg,
                    env,
                    hidden=(
                        *cfg.private_to_head,
                        *([cfg.hide_from_last_worker] if i == cfg.workers else []),
                    ),
                )
                state["nodes"].append(asdict(worker))
                self._write_state(state)
                # One at a time: nodes registering together can miss Ray's start-up deadline
                # on a busy machine.
                self._wait_for_nodes(state, i + 1, cfg.start_timeout_s)
            self._register()
        except BaseException:
            self.down()
            raise
        return state

    def _register(self) -> None:
        """List the cluster in the user's registry, where ``--address auto`` looks."""
        entry = _registry_entry(self.state_dir)
        entry.parent.mkdir(parents=True, exist_ok=True)
        partial = entry.with_suffix(f".partial-{os.getpid()}")
        partial.write_text(json.dumps({"state": str(self.state_dir.resolve())}))
        partial.replace(entry)

    def _start_node(
        self,
        role: str,
        args: list[str],
        cfg: LocalClusterConfig,
        env: dict,
        hidden: tuple[str, ...] = (),
    ) -> NodeProcess:
        log = self.state_dir / f"{role}.log"
        command = [
            ray_executable(),
            "start",
            "--block",
            "--disable-usage-stats",
            "--object-store-memory",
            str(cfg.object_store_mib * 2**20),
            # Ray's fixed default (52365) would clash between nodes on one machine, and with
            # any other Ray instance on it; the job agent lives there.
            "--dashboard-agent-listen-port",
            str(free_port()),
            *args,
        ]
        hidden = tuple(folder for folder in hidden if folder)
        if hidden:
            command = _without_folders(command, hidden)
        with open(log, "ab") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        return NodeProcess(role, process.pid, _start_time(process.pid) or "", str(log))

    def _wait_for_nodes(self, state: dict, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in state["nodes"]:
                if not _group_alive(node["pid"]):
                    raise RuntimeError(
                        f"{node['role']} node exited while starting; see {node['log']}"
                    )
            alive = alive_nodes(state["dashboard_url"])
            if alive is not None and len(alive) >= count:
                return
            time.sleep(1.0)
        raise TimeoutError(
            f"cluster: {count} node(s) not up after {timeout_s:.0f} s; see the logs in "
            f"{self.state_dir}"
        )

    # --- down --------------------------------------------------------------------------------

    def down(self, timeout_s: float = 60.0) -> list[str]:
        """Stop the recorded nodes (workers first), wait for their process groups to empty,
        then remove the state and the cluster's temp folder. Returns the roles stopped."""
        state = self.state()
        if state is None:
            return []
        nodes = [n for n in reversed(self._nodes()) if self._ours_and_alive(n)]
        for node in nodes:
            _signal_group(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while any(_group_alive(n.pid) for n in nodes) and time.monotonic() < deadline:
            time.sleep(0.5)
        for node in nodes:
            _signal_group(node.pid, signal.SIGKILL)
        still = [n.role for n in nodes if _wait_group_gone(n.pid, 10.0)]
        if still:
            raise RuntimeError(f"cluster: {', '.join(still)} would not stop; see {self.state_dir}")
        shutil.rmtree(state.get("temp_dir", ""), ignore_errors=True)
        _registry_entry(self.state_dir).unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)
        return [n.role for n in nodes]


def _reap(pid: int) -> None:
    """Collect an exited leader started by this very process; a zombie still counts as a member
    of its group."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: init reaps it


def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
    """True if the group still has members after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)
    return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _without_folders(command: list[str], folders: tuple[str, ...]) -> list[str]:
    """``command`` in a private mount namespace where each of ``folders`` is an empty tmpfs.
    ``unshare`` execs rather than forks, so the recorded pid and process group stay the node's."""
    mounts = " && ".join(f"mount -t tmpfs tmpfs {shlex.quote(folder)}" for folder in folders)
    mount = f"{mounts} && exec {shlex.join(command)}"
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount]


def _head_address(temp_dir: str, head_log: str, timeout_s: float) -> str:
    """The GCS address the head wrote for others to join (it picks the machine's own IP). The
    dashboard can list the head as alive before the head has written it, so wait for it."""
    path = Path(temp_dir) / "ray_current_cluster"
    deadline = time.monotonic() + timeout_s
    while True:
        address = path.read_text().strip() if path.is_file() else ""
        if address:
            return address
        if time.monotonic() > deadline:
            raise ClusterError(
                f"head node: no address in {path} after {timeout_s:.0f} s; see {head_log}"
            )
        time.sleep(0.1)


def alive_nodes(dashboard_url: str) -> list[dict] | None:
    """The alive nodes as the dashboard lists them (token sent), or None if it is not up yet."""
    request = urllib.request.Request(f"{dashboard_url}/nodes?view=summary", headers=auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return None
    summary = body.get("data", {}).get("summary", [])
    return [node for node in summary if node.get("raylet", {}).get("state") == "ALIVE"]

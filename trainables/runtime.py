"""Connecting to Ray: one place that decides how the driver joins or starts a Ray instance."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import urllib.parse
import uuid
import zipfile
from pathlib import Path

import ray
import ray.data
from ray.exceptions import AuthenticationError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from defectforge.core.errors import ClusterError, ConfigError, DataError
from defectforge.core.files import STATE_FILE
from defectforge.core.interrupt import stop_on_sigterm_as_on_ctrl_c
from defectforge.core.storage import Location, StorageError, is_uri
from defectforge.trainables import VERBOSE_ENV
from defectforge.trainables.epochs import EPOCH_METRICS, ONE_WORKER_RUN


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS; see ``ray_address``), else start a local instance; a
    no-op if connected.

    Token authentication stays on (joining a cluster asks for it); the dashboard binds to
    127.0.0.1. Only a
    local instance gets a runtime environment from here: a cluster's nodes carry their own
    environment, and a Ray Job's driver may not add to the job's.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if ray.is_initialized():
        quiet_ray_data()
        return
    joining = ray_address(address)
    local = joining is None
    verbose = bool(os.environ.get(VERBOSE_ENV))
    try:
        ray.init(
            # "local", not None: Ray would read RAY_ADDRESS again, and join any Ray for "auto".
            address=joining or "local",
            num_cpus=num_cpus if local else None,
            dashboard_host="127.0.0.1",
            # Ray's own lines (and its workers' output) stay in its log files unless verbose:
            # the terminal shows progress bars and defectforge's one-line summaries.
            logging_level=logging.INFO if verbose else logging.ERROR,
            log_to_driver=verbose,
            runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}} if local else None,
        )
    except AuthenticationError:
        # Raised at once because the command line turns token mode on (defectforge.cli).
        raise ClusterError(
            f"{joining}: the cluster wants its auth token and none was found here; set "
            "RAY_AUTH_TOKEN, point RAY_AUTH_TOKEN_PATH at a copy of the cluster's token file, "
            "or copy it to ~/.ray/auth_token (readable by you alone)"
        ) from None
    stop_on_sigterm_as_on_ctrl_c()  # ray.init replaced it with its own
    quiet_ray_data()


# How long an address may take to accept a connection before it counts as not answering.
ANSWER_TIMEOUT_S = 5.0
RAY_CLIENT_PORT = 10001
NOT_LOCAL = ("", "auto", "local")


def ray_address(address: str | None = None) -> str | None:
    """The Ray address to join: ``address``, else RAY_ADDRESS; None (or ``local``): start a
    local instance.

    ``auto`` means the cluster Ray named in RAY_ADDRESS (a Ray Job's driver has it), else the one
    cluster of this user's own that is up (``defectforge cluster up``), never another Ray
    instance that happens to run on the machine (Ray's own ``auto`` joins any). An address that
    does not accept a connection is refused at once, instead of after Ray's retries.
    """
    from_env = os.environ.get("RAY_ADDRESS", "").strip()
    given = (address or from_env or "local").strip()
    if given == "local":
        return None
    if given == "auto":
        given = from_env if from_env not in NOT_LOCAL else _own_cluster()
    if given.startswith(("http://", "https://")):
        raise ClusterError(
            f"{given}: a dashboard (Jobs API) address; give a Ray address (auto, HOST:PORT or "
            "ray://HOST:10001) here, or send a study with `defectforge submit`"
        )
    _check_answers(given)
    return given


def _own_cluster() -> str:
    from defectforge.cluster.local import own_cluster_addresses

    own = own_cluster_addresses()
    if len(own) == 1:
        return next(iter(own))
    if not own:
        raise ClusterError(
            "--address auto: no cluster of yours is up, and auto never joins another Ray "
            "instance on this machine; start one with `defectforge cluster up`, or name the "
            "cluster: --address HOST:PORT or ray://HOST:10001"
        )
    listed = ", ".join(f"{address} ({state})" for address, state in own.items())
    raise ClusterError(
        f"--address auto: {len(own)} clusters of yours are up ({listed}); name one with "
        "--address HOST:PORT"
    )


def _check_answers(address: str) -> None:
    """Refuse ``address`` (HOST:PORT or ray://HOST:PORT) unless something accepts a connection
    there."""
    client = address.startswith("ray://")
    try:
        parts = urllib.parse.urlsplit(address if client else f"//{address}")
        port = parts.port or (RAY_CLIENT_PORT if client else None)
    except ValueError:  # a port that is not a number or out of range, a broken IPv6 host
        parts, port = None, None
    if parts is None or not parts.hostname or port is None:
        raise ClusterError(
            f"{address}: not a Ray address; give auto, HOST:PORT (the head's GCS port) or "
            "ray://HOST:10001"
        )
    try:
        with socket.create_connection((parts.hostname, port), timeout=ANSWER_TIMEOUT_S):
            pass
    except OSError as err:
        reason = (
            f"no answer in {ANSWER_TIMEOUT_S:g} s"
            if isinstance(err, TimeoutError)
            else err.strerror or str(err)
        )
        raise ClusterError(
            f"{address}: nothing accepts a connection there ({reason.lower()}); check the "
            "address and that the cluster is up"
        ) from None


# Ray Data's read and map tasks each take one CPU: whatever workers and actors hold, this much
# stays free for them, or a job that reads data through Ray Data waits forever.
DATA_CPUS = 1.0
# Below this share a worker would get too little time to make progress.
MIN_WORKER_CPUS = 0.25


def worker_cpus(count: int, wanted: float = 1.0, what: str = "workers") -> float:
    """CPUs for each of ``count`` workers or actors: ``wanted``, or less so that DATA_CPUS stay
    free for Ray Data beside them. A cluster too small even for that is refused in one line."""
    total = ray.cluster_resources().get("CPU", 0.0)
    share = min(wanted, (total - DATA_CPUS) / count) if count else wanted
    if share < MIN_WORKER_CPUS:
        needed = count * MIN_WORKER_CPUS + DATA_CPUS
        raise ClusterError(
            f"{count} {what} need at least {needed:g} CPUs ({MIN_WORKER_CPUS:g} each plus "
            f"{DATA_CPUS:g} for reading data) and this Ray cluster has {total:g}; ask for "
            f"fewer {what} or add CPUs"
        )
    return share


def fit(runner, progress=None):
    """``runner.fit()`` (a Ray Train trainer or a Tune tuner) with Ctrl-C reaching the caller.

    Run from the main thread, both install a SIGINT handler of their own that aborts the run
    and then exits the process from inside the handler, which no caller can turn into a message.
    From another thread they leave SIGINT alone (as inside Tune): this thread gets
    KeyboardInterrupt, and the run ends with the process, its checkpoints kept for a resume.
    ``progress`` (a ``progress.ProgressBar``) is polled while the run goes on.
    """
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = runner.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the caller below, unchanged
            outcome["error"] = err

    thread = threading.Thread(target=target, name="defectforge-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(timeout=0.5)
            if progress is not None:
                progress.poll()
    finally:
        if progress is not None:
            progress.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def wait_for_task(ref: ray.ObjectRef, progress=None):
    """``ray.get(ref)``, polling ``progress`` (a ``progress.ProgressBar``) every half second.
    Ctrl-C cancels the task and reaches the caller; what the task saved stays for a rerun."""
    try:
        while not ray.wait([ref], timeout=0.5)[0]:
            if progress is not None:
                progress.poll()
    except KeyboardInterrupt:
        ray.cancel(ref, force=True)
        raise
    finally:
        if progress is not None:
            progress.close()
    return ray.get(ref)


def quiet_ray_data() -> None:
    """Ray Data's execution plans and progress log lines only with --verbose; a single
    overall bar per dataset where the terminal shows bars."""
    if os.environ.get(VERBOSE_ENV):
        return
    # Ray Data configures its loggers again later (for each dataset's log file); this variable,
    # which it reads then, keeps its INFO lines off the terminal after that too.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_operator_progress_bars = False


def latest_checkpoint_dir(storage: str | Path | Location) -> Location | None:
    """The newest whole checkpoint folder under a run's Ray storage (a folder or a store),
    across the first run and any resumed ones, Ray Train's and one-worker runs'
    (``trainables.epochs``) alike. Checkpoint names sort in training order (``epoch_003``,
    ``kimg_00012.000``). Ray copies a checkpoint into its final folder on a disk in place, so a
    process killed mid-copy leaves one with a cut ``.pt`` file (a zip archive missing its end),
    and a one-worker run's folder is whole only with its ``epoch_metrics.json``: such folders
    are passed over. (A store's objects appear whole or not at all.)"""
    storage = Location.of(storage)
    folders = [
        storage / run / name
        for run in storage.subfolders()
        for name in (storage / run).subfolders()
        if "_" in name and _whole_checkpoint(storage / run / name)
    ]
    return max(folders, key=lambda folder: folder.name) if folders else None


def _whole_checkpoint(folder: Location) -> bool:
    if folder.parent.name == ONE_WORKER_RUN and not (folder / EPOCH_METRICS).is_file():
        return False
    weights = folder.files(".pt")
    if folder.remote:
        # Ray uploads a checkpoint's files one by one: the state is what a resume needs.
        return any(file.name == STATE_FILE for file in weights)
    return bool(weights) and all(zipfile.is_zipfile(file.local) for file in weights)


def checkpoint_to_resume(storage: str | Path | Location) -> Location:
    """The run's latest whole checkpoint, which --resume continues from; one line if none."""
    previous = latest_checkpoint_dir(storage)
    if previous is None:
        raise DataError(
            Location.of(storage).parent,
            "no checkpoint to resume from",
            "train it first (without --resume)",
        )
    return previous


def refuse_another_run(out: Location, config: dict, keys: tuple[str, ...]) -> None:
    """A run folder's checkpoints continue only the run they hold: the command run again into
    it with another network shape (architecture, resolution, ...) or other data is refused,
    naming the setting, instead of failing to load them or training on silently."""
    start = latest_checkpoint_dir(out / "ray")
    if start is None or not (start / "config.json").is_file():
        return
    saved = json.loads((start / "config.json").read_text())
    for key in keys:
        given = json.loads(json.dumps(config.get(key)))  # tuples as the JSON's lists
        if key in saved and saved[key] != given:
            raise ConfigError(
                f"{key} = {given!r}: {out.uri} holds a run of {key} = {saved[key]!r}, whose "
                "checkpoints would carry on as if nothing had changed; use a new --out, or the "
                "run's own settings (its --profile and flags) to continue it"
            )


def resumed_run_name(storage: str | Path | Location, base: str) -> tuple[str, Location]:
    """Name for a Ray run that continues a finished one, and the checkpoint it starts from."""
    previous = checkpoint_to_resume(storage)
    return f"{base}-from-{previous.name}", previous


def starting_checkpoint(config: dict):
    """Where a worker starts: Ray's latest checkpoint of this run (after a failure restart),
    else the checkpoint a resumed run was asked to continue from, else None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(config["resume_from"])
    return checkpoint


def join_for_training(out: Location, use_gpu: bool, workers: int) -> None:
    """Ray joined (or started) for a training run of ``workers`` workers that write their
    checkpoints to ``out`` where they run: every node must be able to write there, and GPUs
    asked for that no node has are said at once, not waited for in silence."""
    ensure_ray()
    check_storage_everywhere(out.uri, "--out")
    if use_gpu:
        warn_of_missing({"GPU": workers}, "--use-gpu", "leave out --use-gpu")


def warn_of_missing(asked: dict[str, float], who: str, fix: str) -> None:
    """Resources ``who`` asks for that no node of this Ray cluster has: the work would wait for
    them without a word. Said, not refused: an autoscaling cluster starts such nodes when asked."""
    totals = ray.cluster_resources()
    for name, amount in asked.items():
        if amount > totals.get(name, 0.0):
            print(
                f"defectforge: warning: {who} asks for {amount:g} {name} and the nodes of this "
                f"Ray cluster have {totals.get(name, 0.0):g} in all: it waits until nodes with "
                f"them join (an autoscaling cluster starts them; on any other, {fix})",
                file=sys.stderr,
                flush=True,
            )


def check_shared_storage(root: str, option: str = "storage_path") -> None:
    """Refuse a local ``root`` (given as ``option``) that some node of the cluster cannot see.

    Trials checkpoint wherever their workers run, and the driver reads the results back: on
    several machines a node-local folder silently loses them. A probe file written here is looked
    for from every alive node; URIs (s3://, gs://) are shared by construction.
    """
    if is_uri(root):
        return
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2:
        return
    # Nothing is created for a refused study: the probe goes into the nearest existing folder.
    start = Path(root).resolve()
    folder = next(p for p in (start, *start.parents) if p.is_dir())
    probe = folder / f".shared-storage-probe-{uuid.uuid4().hex}"
    probe.write_text("defectforge")
    try:
        seen = ray.get(
            [
                _sees_file.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                ).remote(str(probe))
                for node in nodes
            ]
        )
    finally:
        probe.unlink(missing_ok=True)
    blind = [node["NodeManagerAddress"] for node, ok in zip(nodes, seen, strict=True) if not ok]
    if blind:
        raise ClusterError(
            f"{option} {root}: not visible from {len(blind)} of {len(nodes)} nodes "
            f"({', '.join(sorted(set(blind)))}); on a multi-node cluster use a folder every node "
            "mounts (NFS, a shared volume) or an s3:// / gs:// URI"
        )


@ray.remote(num_cpus=0)
def _sees_file(path: str) -> bool:
    return Path(path).is_file()


def check_storage_everywhere(root: str, option: str = "storage_path") -> None:
    """Where the work may run, the location must work: a local ``root`` must be one folder every
    node sees (``check_shared_storage``); on a store, every alive node (those that joined since
    the last check too) writes, reads back and deletes a probe there, and a node that cannot is
    one line naming it and the location."""
    if not is_uri(root):
        check_shared_storage(root, option)
        return
    nodes = [node for node in ray.nodes() if node["Alive"]]
    probes = [
        _probe_store.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(root, node["NodeManagerAddress"])
        for node in nodes
    ]
    try:
        ray.get(probes)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, StorageError):
            raise _naming(err.cause, option) from None  # one line, not the remote traceback
        raise


def _naming(err: StorageError, option: str) -> StorageError:
    """A spec key leads the line (a spec names several locations); a flag's location is the one
    just typed."""
    return err if option.startswith("-") else StorageError(f"{option} = {err}")


@ray.remote(num_cpus=0, max_retries=0)
def _probe_store(root: str, node: str) -> None:
    check_store_here(root, node)


def check_store_here(root: str, node: str = "") -> None:
    """The probe of ``check_storage_everywhere`` on this process's node (trials and workers call
    it before they start, so a node that joined later is checked where it works)."""
    if is_uri(root):
        Location.of(root).check_writable(node or ray.util.get_node_ip_address())

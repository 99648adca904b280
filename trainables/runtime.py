"""Connecting to Ray: one place that decides how the driver joins or starts a Ray instance."""

from __future__ import annotations

import logging
import os
import threading
import uuid
import zipfile
from pathlib import Path

import ray
import ray.data
from ray.exceptions import AuthenticationError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from defectforge.datasets.errors import ClusterError, DataError
from defectforge.studies.store import is_uri
from defectforge.trainables import VERBOSE_ENV
from defectforge.trainables.epochs import EPOCH_METRICS, ONE_WORKER_RUN


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS), else start a local instance; a no-op if connected.

    Token authentication stays on (joining a cluster asks for it); the dashboard binds to
    127.0.0.1. Only a
    local instance gets a runtime environment from here: a cluster's nodes carry their own
    environment, and a Ray Job's driver may not add to the job's.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if ray.is_initialized():
        quiet_ray_data()
        return
    local = address in (None, "local")
    joining = address if not local else os.environ.get("RAY_ADDRESS")
    verbose = bool(os.environ.get(VERBOSE_ENV))
    try:
        ray.init(
            address=address,
            num_cpus=num_cpus if local else None,
            dashboard_host="127.0.0.1",
            # Ray's own lines (and its workers' output) stay in its log files unless verbose:
            # the terminal shows progress bars and defectforge's one-line summaries.
            logging_level=logging.INFO if verbose else logging.ERROR,
            log_to_driver=verbose,
            runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}} if local else None,
        )
    except AuthenticationError:
        # Raised at once because the command line turns token mode on (trainables.cli).
        raise ClusterError(
            f"{joining}: the cluster wants its auth token and none was found here; set "
            "RAY_AUTH_TOKEN, point RAY_AUTH_TOKEN_PATH at a copy of the cluster's token file, "
            "or copy it to ~/.ray/auth_token (readable by you alone)"
        ) from None
    quiet_ray_data()


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


def latest_checkpoint_dir(storage: Path) -> Path | None:
    """The newest whole checkpoint folder under a run's Ray storage, across the first run and
    any resumed ones, Ray Train's and one-worker runs' (``trainables.epochs``) alike. Checkpoint
    names sort in training order (``epoch_003``, ``kimg_00012.000``). Ray copies a checkpoint
    into its final folder in place, so a process killed mid-copy leaves one with a cut ``.pt``
    file (a zip archive missing its end), and a one-worker run's folder is whole only with its
    ``epoch_metrics.json``: such folders are passed over."""
    folders = [p for p in storage.glob("*/*_*") if p.is_dir() and _whole_checkpoint(p)]
    return max(folders, key=lambda p: p.name) if folders else None


def _whole_checkpoint(folder: Path) -> bool:
    if folder.parent.name == ONE_WORKER_RUN and not (folder / EPOCH_METRICS).is_file():
        return False
    weights = list(folder.glob("*.pt"))
    return bool(weights) and all(zipfile.is_zipfile(file) for file in weights)


def checkpoint_to_resume(storage: Path) -> Path:
    """The run's latest whole checkpoint, which --resume continues from; one line if none."""
    previous = latest_checkpoint_dir(storage)
    if previous is None:
        raise DataError(
            storage.parent, "no checkpoint to resume from", "train it first (without --resume)"
        )
    return previous


def resumed_run_name(storage: Path, base: str) -> tuple[str, Path]:
    """Name for a Ray run that continues a finished one, and the checkpoint it starts from."""
    previous = checkpoint_to_resume(storage)
    return f"{base}-from-{previous.name}", previous


def starting_checkpoint(config: dict):
    """Where a worker starts: Ray's latest checkpoint of this run (after a failure restart),
    else the checkpoint a resumed run was asked to continue from, else None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint.from_directory(config["resume_from"])
    return checkpoint


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

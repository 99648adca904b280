"""Connecting to Ray: one place that decides how the driver joins or starts a Ray instance."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from defectforge.studies.store import is_uri


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS), else start a local instance; a no-op if connected.

    Token authentication stays as Ray configures it; the dashboard binds to 127.0.0.1. Only a
    local instance gets a runtime environment from here: a cluster's nodes carry their own
    environment, and a Ray Job's driver may not add to the job's.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if ray.is_initialized():
        return
    local = address in (None, "local")
    ray.init(
        address=address,
        num_cpus=num_cpus if local else None,
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}} if local else None,
    )


def latest_checkpoint_dir(storage: Path) -> Path | None:
    """The newest checkpoint folder under a run's Ray storage, across the first run and any
    resumed ones. Checkpoint names sort in training order (``epoch_003``, ``kimg_00012.000``)."""
    folders = [p for p in storage.glob("*/*_*") if p.is_dir() and any(p.glob("*.pt"))]
    return max(folders, key=lambda p: p.name) if folders else None


def resumed_run_name(storage: Path, base: str) -> tuple[str, Path]:
    """Name for a Ray run that continues a finished one, and the checkpoint it starts from."""
    previous = latest_checkpoint_dir(storage)
    if previous is None:
        raise FileNotFoundError(f"{storage.parent}: no checkpoint to resume from; train it first")
    return f"{base}-from-{previous.name}", previous


def starting_checkpoint(config: dict):
    """Where a worker starts: Ray's latest checkpoint of this run (after a failure restart),
    else the checkpoint a resumed run was asked to continue from, else None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint.from_directory(config["resume_from"])
    return checkpoint


def check_shared_storage(root: str) -> None:
    """Refuse a local ``root`` that some node of the cluster cannot see.

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
        raise ValueError(
            f"storage_path {root}: not visible from {len(blind)} of {len(nodes)} nodes "
            f"({', '.join(sorted(set(blind)))}); on a multi-node cluster use a folder every node "
            "mounts (NFS, a shared volume) or an s3:// / gs:// URI"
        )


@ray.remote(num_cpus=0)
def _sees_file(path: str) -> bool:
    return Path(path).is_file()

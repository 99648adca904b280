"""Connecting to Ray: one place that decides how the driver joins or starts a Ray instance."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS), else start a local instance; a no-op if connected.

    Token authentication stays as Ray configures it; the dashboard binds to 127.0.0.1.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if ray.is_initialized():
        return
    ray.init(
        address=address,
        num_cpus=num_cpus if address is None else None,
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}},
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

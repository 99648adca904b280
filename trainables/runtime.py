"""Connecting to Ray: one place that decides how the driver joins or starts a Ray instance."""

from __future__ import annotations

import logging
import os

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

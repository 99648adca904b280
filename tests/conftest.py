"""Shared fixtures: one Ray instance for the session, the bundled NEU-Seg sample built once."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

SAMPLE = Path(__file__).resolve().parent.parent / "datasets" / "sample" / "neu-seg"
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # Workers import test modules (for functions a test hands to Ray) the way pytest does.
    tests = Path(__file__).resolve().parent
    path = os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])
    env = {"NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": path}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_root() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def sample_dataset(ray_session, tmp_path_factory) -> Path:
    from defectforge.datasets.build import BuildConfig
    from defectforge.trainables.data_jobs import build_parquet

    out = tmp_path_factory.mktemp("built") / "neu-sample"
    build_parquet(BuildConfig(source="neu-seg", root=str(SAMPLE), out=str(out)))
    return out


@pytest.fixture
def sample_copy(tmp_path) -> Path:
    """A writable copy of the sample, for tests that damage files."""
    target = tmp_path / "neu"
    shutil.copytree(SAMPLE, target)
    return target

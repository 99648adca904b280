"""Shared fixtures: one Ray instance for the session, the bundled NEU-Seg sample built once."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# As the command line sets it, before any test module imports Ray (Ray reads it when it loads;
# set later, the GCS it starts wants a token its own client does not send).
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Ray Train's controller looks at its workers every 2 s, so a run waits up to 2 s after its last
# checkpoint and again after it ends: minutes over the suite, whose runs last a few steps.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

SAMPLE = Path(__file__).resolve().parent.parent / "datasets" / "sample" / "neu-seg"
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server for the session, reached through the standard variables; set
    before Ray starts, so Ray's workers (and `cluster up`'s nodes) reach it as a user's would."""
    from s3server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    os.environ.update(server.env)
    yield server
    server.stop()
    for name in server.env:
        os.environ.pop(name, None)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server for the session (started by the first test that asks)."""
    from mlflowserver import start_mlflow_server

    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_server):
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
    build_parquet(BuildConfig(source="neu-seg", root=str(SAMPLE)), out)
    return out


@pytest.fixture
def sample_copy(tmp_path) -> Path:
    """A writable copy of the sample, for tests that damage files."""
    target = tmp_path / "neu"
    shutil.copytree(SAMPLE, target)
    return target


# --- a labelled synthetic set on the sample (untrained GAN, biased labeller) ---------------
# Made twice: on the sample as built, and on the sample with a test split carved from its
# train split (another dataset: a set made from the first leaks into the second's test split).


@pytest.fixture(scope="session")
def sample_with_test(ray_session, tmp_path_factory) -> Path:
    from defectforge.datasets.build import BuildConfig
    from defectforge.trainables.data_jobs import build_parquet

    out = tmp_path_factory.mktemp("built") / "neu-sample-test"
    build_parquet(BuildConfig(source="neu-seg", root=str(SAMPLE), test_fraction=0.4), out)
    return out


def _labeller_run(dataset: Path, folder: Path) -> Path:
    """A labeller whose head is biased to call every pixel "patches" with near certainty, so the
    pipeline's bookkeeping is tested independently of what a trained model would find."""
    import torch

    from defectforge.segmentation.checkpoint import save_model
    from defectforge.segmentation.models import build_model
    from defectforge.trainables.seg import config_from_manifest

    cfg = config_from_manifest(dataset, epochs=1)
    model = build_model(cfg.arch, cfg.encoder, cfg.channels, cfg.num_classes)
    with torch.no_grad():
        head = model.segmentation_head[0]
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 12.0, 0.0]))
    return save_model(folder / "run", model, cfg)


def _generated_images(dataset: Path, folder: Path) -> Path:
    """Images of an untrained generator, recorded as learnt from ``dataset``'s train split."""
    import torch

    from defectforge.datasets.manifest import Manifest
    from defectforge.gan.checkpoint import CONFIG_FILE, GENERATOR_FILE, build_generator
    from defectforge.gan.config import GanConfig
    from defectforge.trainables.gan_samples import write_generated

    run = folder / "run"
    run.mkdir(parents=True)
    cfg = GanConfig(
        data=str(dataset),
        data_manifest_id=Manifest.load(dataset).dataset_id,
        channels=1,
        resolution=32,
        z_dim=16,
        w_dim=16,
        channel_base=128,
        channel_max=16,
    )
    torch.save(build_generator(cfg).state_dict(), run / GENERATOR_FILE)
    (run / CONFIG_FILE).write_text(cfg.to_json())
    out = folder / "generated"
    write_generated(run, out, list(range(32)))
    return out


def _labelled_set(generated: Path, labeller: Path, folder: Path, **options) -> Path:
    from defectforge.segmentation.pseudo_label import Corrections, LabelConfig
    from defectforge.trainables.synth import label_synthetic

    out = folder / "synthetic"
    cfg = LabelConfig(
        images=str(generated),
        labeller=str(labeller),
        corrections=Corrections(min_region_area=20),
        actors=2,
        **options,
    )
    label_synthetic(cfg, out)
    return out


@pytest.fixture(scope="session")
def labeller(sample_dataset, tmp_path_factory) -> Path:
    return _labeller_run(sample_dataset, tmp_path_factory.mktemp("labeller"))


@pytest.fixture(scope="session")
def generated(sample_dataset, tmp_path_factory) -> Path:
    return _generated_images(sample_dataset, tmp_path_factory.mktemp("gan"))


@pytest.fixture(scope="session")
def labelled(generated, labeller, tmp_path_factory) -> Path:
    return _labelled_set(generated, labeller, tmp_path_factory.mktemp("labelled"))


@pytest.fixture(scope="session")
def labeller_with_test(sample_with_test, tmp_path_factory) -> Path:
    return _labeller_run(sample_with_test, tmp_path_factory.mktemp("labeller-with-test"))


@pytest.fixture(scope="session")
def labelled_with_test(sample_with_test, labeller_with_test, tmp_path_factory) -> Path:
    """The labelled set again, its makers trained on ``sample_with_test``'s train split."""
    folder = tmp_path_factory.mktemp("labelled-with-test")
    generated = _generated_images(sample_with_test, folder / "gan")
    return _labelled_set(generated, labeller_with_test, folder)

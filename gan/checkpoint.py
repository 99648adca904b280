"""GAN checkpoint files: resume state and the exported generator, state dicts + config JSON.

A snapshot folder holds ``state.pt`` (G, D, both optimisers, counters, RNG) and ``generator.pt``
(G_ema weights: what generation needs; together with state.pt, enough to resume), ``config.json`` and
``samples.png`` (the fixed-seed grid). Written under temp names and renamed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from defectforge.core.errors import DataError
from defectforge.core.files import (
    STATE_FILE,
    atomic_write,
    load_state_dict_file,
    require_files,
)
from defectforge.core.storage import Location, local_folder
from defectforge.gan.config import GanConfig
from defectforge.gan.networks import Discriminator, Generator

GENERATOR_FILE = "generator.pt"
CONFIG_FILE = "config.json"
SAMPLES_FILE = "samples.png"
METRICS_FILE = "metrics.json"
# RUN/snapshots/kimg_NNNNN.NNN/: every snapshot's generator + config, kept for later scoring.
SNAPSHOTS_DIR = "snapshots"
# RUN/samples/kimg_NNNNN.NNN.png: the fixed-seed grid of every snapshot.
SAMPLES_DIR = "samples"


def snapshot_name(kimg: float) -> str:
    """A snapshot's name: its checkpoint folder, sample grid and kept generator."""
    return f"kimg_{kimg:09.3f}"


def kimg_of(name: str) -> float:
    """The kimg of a snapshot named by ``snapshot_name``."""
    return float(name.removeprefix("kimg_"))


def build_generator(cfg: GanConfig) -> Generator:
    return Generator(
        cfg.resolution,
        cfg.output_channels,
        cfg.z_dim,
        cfg.w_dim,
        cfg.mapping_layers,
        cfg.channel_base,
        cfg.channel_max,
        cfg.num_classes,
        cfg.mask_channels,
    )


def build_discriminator(cfg: GanConfig) -> Discriminator:
    return Discriminator(
        cfg.resolution, cfg.output_channels, cfg.channel_base, cfg.channel_max, cfg.num_classes
    )


def save_gan_checkpoint(folder: Path, trainer) -> None:
    """G_ema goes to ``generator.pt`` only; ``state.pt`` holds the rest of the resume state."""
    folder.mkdir(parents=True, exist_ok=True)
    state = trainer.state_dict()
    generator = state.pop("G_ema")
    atomic_write(folder / STATE_FILE, lambda tmp: torch.save(state, tmp))
    atomic_write(folder / GENERATOR_FILE, lambda tmp: torch.save(generator, tmp))
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(trainer.cfg.to_json()))


def load_gan_state(folder: Path) -> dict:
    """The full resume state (``GanTrainer.state_dict``) of a snapshot folder."""
    folder = Path(folder)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    state["G_ema"] = torch.load(folder / GENERATOR_FILE, map_location="cpu", weights_only=True)
    return state


def _refuse_unpublished(run: Path) -> None:
    """A run that published no generator (none of its snapshots beat the untrained start) says
    so, rather than that a file is missing."""
    summary = run / METRICS_FILE
    if (run / GENERATOR_FILE).is_file() or not summary.is_file():
        return
    published = True
    with contextlib.suppress(OSError, ValueError):
        published = json.loads(summary.read_text()).get("best", {}) is not None
    if not published:
        raise DataError(
            run,
            "this GAN run published no generator: none of its snapshots beat the untrained "
            "start (see its metrics.json and plots/)",
            "train it longer (`gan train --resume --kimg ...`), or pick one of its kept "
            "snapshots (RUN/snapshots/kimg_...) on purpose",
        )


def _refuse_unfinished(run: Location) -> None:
    """A run still training, or stopped before it published, is a run: its kept snapshots are
    what can be given meanwhile. Looked at where the run is (a store's too): a local copy of a
    store's run folder holds its top-level files only."""
    if (run / CONFIG_FILE).is_file() or (run / METRICS_FILE).is_file():
        return
    kept = [
        run / SNAPSHOTS_DIR / name
        for name in (run / SNAPSHOTS_DIR).subfolders()
        if (run / SNAPSHOTS_DIR / name / GENERATOR_FILE).is_file()
    ]
    if kept:
        raise DataError(
            run,
            "this GAN run has not published a generator yet (it is training, or was stopped "
            f"at {kept[-1].name})",
            f"give one of its snapshots, e.g. the latest: {kept[-1]}, or finish the run (its "
            "`gan train` command again)",
        )


def gan_run_config(folder: str | Path) -> GanConfig:
    """The config a run (or snapshot) folder was trained with, without loading its weights."""
    _refuse_unfinished(Location.of(folder))
    folder = local_folder(folder)
    folder = require_files(folder, (CONFIG_FILE,), "defectforge gan train")
    return GanConfig.load(folder / CONFIG_FILE)


def load_generator(folder: str | Path, device: str | torch.device = "cpu"):
    """(G_ema in eval mode, its config) from a run folder or snapshot folder."""
    _refuse_unfinished(Location.of(folder))
    folder = local_folder(folder)
    _refuse_unpublished(folder)
    folder = require_files(folder, (CONFIG_FILE, GENERATOR_FILE), "defectforge gan train")
    cfg = GanConfig.load(folder / CONFIG_FILE)
    generator = build_generator(cfg)
    state = load_state_dict_file(folder / GENERATOR_FILE, "generator weights")
    try:
        generator.load_state_dict(state)
    except RuntimeError:
        raise DataError(
            folder / GENERATOR_FILE,
            f"the weights do not fit the generator that {CONFIG_FILE} describes",
            f"keep {GENERATOR_FILE} and {CONFIG_FILE} of the same run together",
        ) from None
    return generator.to(device).eval().requires_grad_(False), cfg

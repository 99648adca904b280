"""GAN checkpoint files: resume state and the exported generator, state dicts + config JSON.

A snapshot folder holds ``state.pt`` (G, D, G_ema, both optimisers, counters, RNG: enough to
resume), ``generator.pt`` (G_ema weights only: what generation needs), ``config.json`` and
``samples.png`` (the fixed-seed grid). Written under temp names and renamed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from defectforge.datasets.contract import encode_png
from defectforge.gan.config import GanConfig
from defectforge.gan.networks import Discriminator, Generator

STATE_FILE = "state.pt"
GENERATOR_FILE = "generator.pt"
CONFIG_FILE = "config.json"
SAMPLES_FILE = "samples.png"


def build_generator(cfg: GanConfig) -> Generator:
    return Generator(
        cfg.resolution,
        cfg.channels,
        cfg.z_dim,
        cfg.w_dim,
        cfg.mapping_layers,
        cfg.channel_base,
        cfg.channel_max,
        cfg.num_classes,
    )


def build_discriminator(cfg: GanConfig) -> Discriminator:
    return Discriminator(
        cfg.resolution, cfg.channels, cfg.channel_base, cfg.channel_max, cfg.num_classes
    )


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    write(tmp)
    os.replace(tmp, path)


def write_png(path: Path, image: np.ndarray) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_bytes(encode_png(image)))


def save_gan_checkpoint(folder: Path, trainer) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _atomic(folder / STATE_FILE, lambda tmp: torch.save(trainer.state_dict(), tmp))
    _atomic(folder / GENERATOR_FILE, lambda tmp: torch.save(trainer.G_ema.state_dict(), tmp))
    _atomic(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(trainer.cfg.to_json()))


def load_gan_state(folder: Path) -> dict:
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)


def load_generator(folder: str | Path, device: str | torch.device = "cpu"):
    """(G_ema in eval mode, its config) from a run folder or snapshot folder."""
    folder = Path(folder)
    for name in (CONFIG_FILE, GENERATOR_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder}: no {name}; pass a run folder written by "
                "`defectforge gan train` (or one of its snapshots)"
            )
    cfg = GanConfig.load(folder / CONFIG_FILE)
    generator = build_generator(cfg)
    generator.load_state_dict(
        torch.load(folder / GENERATOR_FILE, map_location="cpu", weights_only=True)
    )
    return generator.to(device).eval().requires_grad_(False), cfg

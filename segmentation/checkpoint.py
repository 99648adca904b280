"""Checkpoint files: resume state and the exported model, both plain state dicts + config JSON.

A checkpoint folder holds ``model.pt`` (weights only, no DDP prefix), ``state.pt`` (optimizer,
scheduler, epoch, best score, history, RNG: enough to resume exactly) and ``config.json``.
Everything is written under a temp name and renamed, and loaded with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from defectforge.core.errors import DataError
from defectforge.core.files import (
    STATE_FILE,
    atomic_write,
    load_state_dict_file,
    require_files,
)
from defectforge.core.storage import local_folder
from defectforge.segmentation.config import SegConfig
from defectforge.segmentation.exported import MODEL_JSON
from defectforge.segmentation.models import build_model

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_model(folder: str | Path, model: nn.Module, cfg: SegConfig) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    atomic_write(folder / MODEL_FILE, lambda tmp: torch.save(state, tmp))
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(cfg.to_json()))
    return folder


def save_training_state(folder: str | Path, state: dict) -> None:
    atomic_write(Path(folder) / STATE_FILE, lambda tmp: torch.save(state, tmp))


def load_training_state(folder: str | Path) -> dict:
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def load_model(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, SegConfig]:
    """Rebuild a model from ``config.json`` and load ``model.pt`` (weights only)."""
    folder = local_folder(folder)
    refuse_an_export(folder)
    folder = require_files(folder, (CONFIG_FILE, MODEL_FILE), "defectforge seg train")
    cfg = SegConfig.load(folder / CONFIG_FILE)
    model = build_model(cfg.arch, cfg.encoder, cfg.channels, cfg.num_classes)
    load_weights(model, folder / MODEL_FILE, folder / CONFIG_FILE)
    return model.to(device).eval(), cfg


def refuse_an_export(folder: Path) -> None:
    """An export (``model.json``, no ``config.json``) given where a training run is read."""
    if (folder / MODEL_JSON).is_file() and not (folder / CONFIG_FILE).is_file():
        raise DataError(
            folder,
            "is an export (model.json), and this command reads a training run",
            "pass the run folder of `seg train` it was exported from (`predict` takes an export)",
        )


def load_weights(model: nn.Module, weights: Path, config: Path) -> None:
    """Load a weights file into ``model``; one that does not fit its config is a DataError."""
    state = load_state_dict_file(weights, "model weights")
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise DataError(
            weights,
            f"the weights do not fit the network that {config.name} describes (another "
            "architecture, encoder or class count)",
            f"keep {weights.name} and {config.name} of the same run together",
        ) from None

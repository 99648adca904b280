"""Checkpoint files: resume state and the exported model, both plain state dicts + config JSON.

A checkpoint folder holds ``model.pt`` (weights only, no DDP prefix), ``state.pt`` (optimizer,
scheduler, epoch, best score, history, RNG: enough to resume exactly) and ``config.json``.
Everything is written under a temp name and renamed, and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from defectforge.segmentation.config import SegConfig
from defectforge.segmentation.models import build_model

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _save_atomic(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_text_atomic(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def save_model(folder: str | Path, model: nn.Module, cfg: SegConfig) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    _save_atomic(state, folder / MODEL_FILE)
    _write_text_atomic(cfg.to_json(), folder / CONFIG_FILE)
    return folder


def save_training_state(folder: str | Path, state: dict) -> None:
    _save_atomic(state, Path(folder) / STATE_FILE)


def load_training_state(folder: str | Path) -> dict:
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)


def load_model(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, SegConfig]:
    """Rebuild a model from ``config.json`` and load ``model.pt`` (weights only)."""
    folder = Path(folder)
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder}: no {name}; pass a run folder written by "
                "`defectforge seg train` (or one of its checkpoints)"
            )
    cfg = SegConfig.load(folder / CONFIG_FILE)
    model = build_model(cfg.arch, cfg.encoder, cfg.channels, cfg.num_classes)
    model.load_state_dict(torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True))
    return model.to(device).eval(), cfg

"""The segmentation training loop: a plain function, runnable with or without Ray.

The caller supplies batches and callbacks (``LoopIO``); the loop owns the model, optimiser,
schedule, validation, checkpoints and best-on-validation selection. Under DDP the caller wraps the
model through ``prepare_model``; validation statistics are summed across ranks here.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from defectforge.core.errors import ConfigError
from defectforge.core.files import scratch_folder
from defectforge.segmentation.checkpoint import (
    MODEL_FILE,
    load_training_state,
    save_model,
    save_training_state,
    unwrap,
)
from defectforge.segmentation.config import SegConfig
from defectforge.segmentation.losses import CombinedLoss
from defectforge.segmentation.metrics import MetricAccumulator
from defectforge.segmentation.models import build_model
from defectforge.segmentation.selection import RANKING_METRIC, SELECTION_METRIC, ranking_score

# Epochs trained so far (epoch + 1), on every epoch's metrics: what a scheduler counts its rungs
# in, since a resumed run may report fewer results than it trained epochs.
EPOCHS_TRAINED = "epochs_trained"


@dataclass
class LoopIO:
    """What the loop needs from its runner.

    ``train_batches(epoch)`` and ``val_batches()`` yield dicts with ``image`` (NCHW float) and
    ``mask`` (NHW int64) as numpy arrays or tensors. ``report(metrics, checkpoint_dir)`` is called
    once per epoch on every rank; ``checkpoint_dir`` is None on ranks other than 0.
    """

    train_batches: Callable[[int], Iterable[dict]]
    val_batches: Callable[[], Iterable[dict]]
    steps_per_epoch: int
    report: Callable[[dict, Path | None], None]
    resume_from: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prepare_model: Callable[[nn.Module], nn.Module] = lambda model: model
    rank: int = 0
    on_epoch_start: Callable[[int], None] = lambda epoch: None


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _as_tensors(batch: dict, device: torch.device, channels_last: bool):
    images = torch.as_tensor(batch["image"]).to(device, non_blocking=True)
    masks = torch.as_tensor(batch["mask"]).to(device, non_blocking=True).long()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, masks


def _autocast(device: torch.device):
    # bf16 only where it pays (CUDA); CPU stays plain fp32 for exact, portable results.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def evaluate(
    model: nn.Module, batches: Iterable[dict], cfg: SegConfig, device: torch.device
) -> dict:
    """Metrics over every batch; under DDP the statistics of all ranks are summed first."""
    model.eval()
    accumulator = MetricAccumulator(cfg.num_classes)
    with torch.no_grad(), _autocast(device):
        for batch in batches:
            images, masks = _as_tensors(batch, device, device.type == "cuda")
            accumulator.update(model(images).float(), masks)
    if dist.is_available() and dist.is_initialized():
        # NCCL (GPU workers) reduces only tensors on the GPU; gloo takes them where they are.
        cm = accumulator.cm.to(device)
        dist.all_reduce(cm)
        accumulator.cm = cm.cpu()
        soft = accumulator.soft.to(device)
        dist.all_reduce(soft)
        accumulator.soft = soft.cpu()
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, accumulator.per_image)
        accumulator.per_image = [t for part in gathered for t in part]
    return accumulator.summary(list(cfg.output_classes))


def train_segmentation(cfg: SegConfig, io: LoopIO) -> dict:
    """Train for ``cfg.epochs``, validating and checkpointing every epoch. Returns the last
    epoch's metrics (with the best validation score so far)."""
    seed_everything(cfg.seed + io.rank)
    device = io.device
    model = build_model(cfg.arch, cfg.encoder, cfg.channels, cfg.num_classes, cfg.encoder_weights)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = io.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * io.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, cfg.warmup_fraction)
    )
    criterion = CombinedLoss(cfg.loss, cfg.tversky_alpha, cfg.focal_gamma)
    start_epoch, best, history = 0, -1.0, []
    if io.resume_from is not None:
        state = load_training_state(io.resume_from)
        # The weights live once per checkpoint, in model.pt (the same file that is published).
        weights = torch.load(io.resume_from / MODEL_FILE, map_location="cpu", weights_only=True)
        unwrap(model).load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _reapply_hyperparameters(optimizer, cfg)
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]

    metrics: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        io.on_epoch_start(epoch)
        epoch_started = time.perf_counter()
        loss, img_per_s = _train_epoch(
            model,
            io.train_batches(epoch),
            criterion,
            optimizer,
            scheduler,
            total_steps,
            cfg,
            device,
        )
        val = evaluate(model, io.val_batches(), cfg, device)
        metrics = _epoch_metrics(epoch, loss, img_per_s, val, optimizer)
        metrics["epoch_seconds"] = time.perf_counter() - epoch_started
        improved = (metrics[SELECTION_METRIC] or 0.0) > best
        best = max(best, metrics[SELECTION_METRIC] or 0.0)
        metrics["best_val_binary_defect_iou"] = best
        history.append({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})
        _checkpoint_and_report(
            io, cfg, model, optimizer, scheduler, epoch, best, history, metrics, improved
        )
    return metrics


def _train_epoch(
    model,
    batches,
    criterion,
    optimizer,
    scheduler,
    total_steps: int,
    cfg: SegConfig,
    device: torch.device,
) -> tuple[float, float]:
    """One pass over the training batches: (mean loss, images per second).

    The clock starts when the first batch arrives, so img/s is the steady-state rate (as the plain
    loop's warm-up-free figure in the benchmark); the epoch's full wall time is reported beside it.
    """
    model.train()
    started, seen, loss_sum, steps = None, 0, 0.0, 0
    for batch in batches:
        if cfg.max_steps_per_epoch and steps >= cfg.max_steps_per_epoch:
            break
        started = started or time.perf_counter()
        images, masks = _as_tensors(batch, device, device.type == "cuda")
        with _autocast(device):
            loss = criterion(model(images).float(), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler.last_epoch < total_steps:
            scheduler.step()
        loss_sum, seen, steps = loss_sum + loss.item(), seen + len(images), steps + 1
    if not steps:
        # Whole batches only: a run on fewer images than a batch would publish untrained weights.
        raise ConfigError(
            f"batch_size = {cfg.batch_size}: the train data gave no whole batch this epoch, so "
            "no training step ran; lower batch_size (--batch-size) or add train images"
        )
    return loss_sum / steps, seen / (time.perf_counter() - started)


def _reapply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: SegConfig) -> None:
    # A resumed run may carry a changed config (e.g. more weight decay); the config wins.
    for group in optimizer.param_groups:
        group["weight_decay"] = cfg.weight_decay
        group["initial_lr"] = cfg.lr


def _epoch_metrics(
    epoch: int,
    train_loss: float,
    train_img_per_s: float,
    val: dict,
    optimizer: torch.optim.Optimizer,
) -> dict:
    metrics = {
        "epoch": epoch,
        EPOCHS_TRAINED: epoch + 1,
        "train_loss": train_loss,
        "train_img_per_s": train_img_per_s,
        "lr": optimizer.param_groups[0]["lr"],
    }
    for key, value in val.items():
        metrics[f"val_{key}"] = value
    metrics[RANKING_METRIC] = ranking_score(metrics)
    return metrics


def _checkpoint_and_report(
    io: LoopIO,
    cfg: SegConfig,
    model,
    optimizer,
    scheduler,
    epoch: int,
    best: float,
    history: list,
    metrics: dict,
    improved: bool,
) -> None:
    if io.rank != 0:
        io.report(metrics, None)
        return
    with scratch_folder("ckpt") as folder:
        save_model(folder, model, cfg)
        save_training_state(
            folder,
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "best": best,
                "history": history,
                "torch_rng": torch.get_rng_state(),
                "improved": improved,
            },
        )
        io.report(metrics, Path(folder))

"""The GAN training loop: StyleGAN2 losses, lazy regularisation, EMA, snapshots. No Ray.

Multi-process runs average gradients explicitly with ``torch.distributed`` after each backward
(rather than wrapping G and D in DDP, whose hooks fit badly with a GAN's several forward passes
and frozen networks per phase); parameters start identical, so they stay identical.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from defectforge.core.files import scratch_folder
from defectforge.datasets.contract import write_png
from defectforge.gan.checkpoint import (
    SAMPLES_FILE,
    build_discriminator,
    build_generator,
    load_gan_state,
    save_gan_checkpoint,
)
from defectforge.gan.config import GanConfig
from defectforge.gan.diffaug import diff_augment
from defectforge.gan.generate import cycled_classes, generate_samples, sample_grid
from defectforge.gan.metrics import sliced_wasserstein
from defectforge.gan.networks import mbstd_group

GRID_SEEDS = range(16)
# A progress line between snapshots at most this often: a bar that moves, not a log that floods.
PROGRESS_SECONDS = 5.0
METRIC_SEED = 123456
# All-reduce bucket size (DDP's default): large enough that per-collective latency is amortised.
GRADIENT_BUCKET_BYTES = 25 * 2**20


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _average_gradients(module: nn.Module) -> None:
    """Average gradients over workers, a few flat buckets at a time instead of one collective per
    parameter (G has ~90), every bucket in flight before the first wait. Not overlapped with the
    backward pass: the lazy path-length pass adds to G's gradients after ``backward``."""
    if not _distributed():
        return
    world = dist.get_world_size()
    buckets = _buckets([p.grad for p in module.parameters() if p.grad is not None])
    flats = [torch.cat([grad.reshape(-1) for grad in bucket]) for bucket in buckets]
    pending = [dist.all_reduce(flat, async_op=True) for flat in flats]
    for bucket, flat, work in zip(buckets, flats, pending, strict=True):
        work.wait()
        flat /= world
        for grad, averaged in zip(
            bucket, flat.split([grad.numel() for grad in bucket]), strict=True
        ):
            grad.copy_(averaged.view_as(grad))


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive tensors of one dtype, up to ``GRADIENT_BUCKET_BYTES`` a bucket."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        fits = buckets and size + nbytes <= GRADIENT_BUCKET_BYTES
        if fits and buckets[-1][0].dtype == tensor.dtype:
            buckets[-1].append(tensor)
            size += nbytes
        else:
            buckets.append([tensor])
            size = nbytes
    return buckets


def _broadcast(module: nn.Module) -> None:
    if _distributed():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def one_hot(labels: torch.Tensor | None, num_classes: int) -> torch.Tensor | None:
    return F.one_hot(labels, num_classes).float() if num_classes and labels is not None else None


def soften_masks(images: torch.Tensor, image_channels: int, sigma: float) -> torch.Tensor:
    """The mask channels after ``image_channels`` blurred by a Gaussian of ``sigma`` px, for D's
    eyes only: real masks are exactly +-1, and a discriminator that sees that gives away real
    from drawn at once (and the generator never learns); blurred, both are judged by shape."""
    radius = max(1, math.ceil(2.5 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    masks = images[:, image_channels:]
    k = masks.shape[1]
    padded = F.pad(masks, (radius, radius, radius, radius), mode="replicate")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(k, 1, 1, -1), groups=k)
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1).expand(k, 1, -1, 1), groups=k)
    return torch.cat([images[:, :image_channels], blurred], dim=1)


def _logistic_d_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """D's non-saturating logistic loss: fakes pushed down, reals up."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def _lazy_adam(params, lr: float, interval: int) -> torch.optim.Adam:
    # Lazy regularisation runs every `interval` steps; scale lr and betas as StyleGAN2 does.
    ratio = interval / (interval + 1)
    # fused: one kernel over all tensors (CPU and CUDA) instead of a dozen ops per parameter.
    return torch.optim.Adam(params, lr=lr * ratio, betas=(0.0, 0.99**ratio), eps=1e-8, fused=True)


@dataclass
class GanLoopIO:
    """``real_batches`` yields dicts with ``image`` (N x C x H x W in [-1, 1]) and ``label``
    (N int64 class index, used when conditional). ``real_for_metric()`` returns uint8 NHWC
    images; ``sample_metrics``, if given, scores the samples SWD scores by other measures.
    ``report(metrics, checkpoint_dir)`` is called at every snapshot on every rank."""

    real_batches: Iterator[dict]
    report: Callable[[dict, Path | None], None]
    real_for_metric: Callable[[], np.ndarray]
    resume_from: Path | None = None
    # More measures of a snapshot's metric samples (images, drawn masks or None) -> metrics.
    sample_metrics: Callable[[np.ndarray, np.ndarray | None], dict] | None = None
    # Between snapshots, every PROGRESS_SECONDS: kimg, img/s and the last losses (rank 0).
    progress: Callable[[dict], None] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0


class GanTrainer:
    """Networks, optimisers and counters of one run; ``step`` is one G and one D update."""

    def __init__(self, cfg: GanConfig, device: torch.device, rank: int = 0):
        self.cfg, self.device, self.rank = cfg, device, rank
        torch.manual_seed(cfg.seed)
        self.G = build_generator(cfg).to(device)
        self.D = build_discriminator(cfg).to(device)
        _broadcast(self.G)
        _broadcast(self.D)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.opt_G = _lazy_adam(self.G.parameters(), cfg.g_lr, self._g_interval)
        self.opt_D = _lazy_adam(self.D.parameters(), cfg.d_lr, cfg.r1_interval)
        self.step_count, self.images_seen = 0, 0
        self.pl_mean = torch.zeros([], device=device)
        self.history: list[dict] = []
        torch.manual_seed(cfg.seed * 1000 + rank + 1)

    @property
    def _g_interval(self) -> int:
        return self.cfg.pl_interval if self.cfg.pl_weight else 10**9

    @property
    def kimg(self) -> float:
        return self.images_seen / 1000

    def _labels(self, n: int) -> torch.Tensor | None:
        if not self.cfg.num_classes:
            return None
        return torch.randint(0, self.cfg.num_classes, (n,), device=self.device)

    def _mapped(self, n: int, c: torch.Tensor | None) -> torch.Tensor:
        """ws for n samples, with style mixing regularisation (two z's, a random crossover)."""
        G = self.G
        z = torch.randn(n, self.cfg.z_dim, device=self.device)
        w = G.mapping(z, c, update_w_avg=True)
        ws = w.unsqueeze(1).repeat(1, G.num_ws, 1)
        if self.cfg.style_mixing_prob > 0 and torch.rand([]) < self.cfg.style_mixing_prob:
            cutoff = int(torch.randint(1, G.num_ws, []))
            w2 = G.mapping(torch.randn_like(z), c)
            ws[:, cutoff:] = w2.unsqueeze(1)
        return ws

    def _mixed_precision(self):
        """bf16 autocast for the convolutions of synthesis and D (StyleGAN2-ADA likewise runs its
        high-resolution layers in reduced precision); mapping, losses and optimisers stay fp32."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"
        )

    def _synthesize(self, ws: torch.Tensor) -> torch.Tensor:
        with self._mixed_precision():
            return self.G.synthesize(ws).float()

    def _d_logits(self, images: torch.Tensor, c: torch.Tensor | None, group: int = 4):
        if self.cfg.mask_channels and self.cfg.mask_blur:
            images = soften_masks(images, self.cfg.channels, self.cfg.mask_blur)
        augmented = diff_augment(
            images, self.cfg.diffaug, self.cfg.diffaug_strength, image_channels=self.cfg.channels
        )
        with self._mixed_precision():
            return self.D(augmented, c, group).float()

    def step(self, real: torch.Tensor, labels: torch.Tensor | None) -> dict:
        cfg, n = self.cfg, real.shape[0]
        c_real = one_hot(labels, cfg.num_classes)
        c_fake = one_hot(self._labels(n), cfg.num_classes)
        stats = {}

        self.G.requires_grad_(True)
        self.D.requires_grad_(False)
        fake = self._synthesize(self._mapped(n, c_fake))
        g_loss = F.softplus(-self._d_logits(fake, c_fake)).mean()
        self.opt_G.zero_grad(set_to_none=True)
        g_loss.backward()
        if cfg.pl_weight and self.step_count % cfg.pl_interval == 0:
            stats["pl_penalty"] = self._path_length_penalty(n).item()
        _average_gradients(self.G)
        self.opt_G.step()
        if _distributed():
            dist.all_reduce(self.G.mapping.w_avg)
            self.G.mapping.w_avg /= dist.get_world_size()

        self.G.requires_grad_(False)
        self.D.requires_grad_(True)
        d_loss = self._d_loss(fake.detach(), c_fake, real, c_real, stats)
        self.opt_D.zero_grad(set_to_none=True)
        d_loss.backward()
        _average_gradients(self.D)
        self.opt_D.step()

        world = dist.get_world_size() if _distributed() else 1
        self.images_seen += n * world
        self.step_count += 1
        self._update_ema(n * world)
        return {"g_loss": g_loss.item(), "d_loss": d_loss.item(), **stats}

    def _d_loss(self, fake, c_fake, real, c_real, stats: dict) -> torch.Tensor:
        cfg, n = self.cfg, real.shape[0]
        if self.step_count % cfg.r1_interval:
            # One D pass over fakes then reals (bigger, cheaper convolutions); minibatch-std
            # groups divide n, so no group mixes the two sets.
            both = torch.cat([fake, real])
            c_both = None if c_fake is None else torch.cat([c_fake, c_real])
            fake_logits, real_logits = self._d_logits(both, c_both, mbstd_group(n)).split(n)
            return _logistic_d_loss(fake_logits, real_logits)
        # On R1 steps the reals get a pass of their own, so the penalty's double backward runs
        # over n images instead of 2n.
        real = real.detach().requires_grad_(True)
        fake_logits = self._d_logits(fake, c_fake, mbstd_group(n))
        real_logits = self._d_logits(real, c_real, mbstd_group(n))
        (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
        r1 = grad.square().sum(dim=(1, 2, 3)).mean()
        stats["r1"] = r1.item()
        penalty = r1 * (cfg.effective_r1_gamma / 2) * cfg.r1_interval
        return _logistic_d_loss(fake_logits, real_logits) + penalty

    def _path_length_penalty(self, n: int) -> torch.Tensor:
        batch = max(1, n // 2)
        ws = self._mapped(batch, one_hot(self._labels(batch), self.cfg.num_classes))
        ws.requires_grad_(True)
        images = self._synthesize(ws)
        noise = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])
        (grad,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
        lengths = grad.square().sum(2).mean(1).sqrt()
        self.pl_mean.copy_(self.pl_mean.lerp(lengths.mean().detach(), 0.01))
        penalty = (lengths - self.pl_mean).square().mean()
        (penalty * self.cfg.pl_weight * self.cfg.pl_interval).backward()
        return penalty

    @torch.no_grad()
    def _update_ema(self, batch: int) -> None:
        # Ramp-up (StyleGAN2-ADA): early on, the half-life is at most a fraction of the images
        # seen, so G_ema follows G instead of staying near its random initialisation.
        half_life = self.cfg.ema_kimg * 1000
        if self.cfg.ema_rampup:
            half_life = min(half_life, self.images_seen * self.cfg.ema_rampup)
        beta = 0.5 ** (batch / max(half_life, 1e-8))
        torch._foreach_lerp_(list(self.G_ema.parameters()), list(self.G.parameters()), 1 - beta)
        torch._foreach_copy_(list(self.G_ema.buffers()), list(self.G.buffers()))

    def state_dict(self) -> dict:
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "step": self.step_count,
            "images_seen": self.images_seen,
            "pl_mean": self.pl_mean.cpu(),
            "history": self.history,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        # The config wins over the saved learning rates: a resumed run may have changed them.
        for optimizer, lr, interval in (
            (self.opt_G, self.cfg.g_lr, self._g_interval),
            (self.opt_D, self.cfg.d_lr, self.cfg.r1_interval),
        ):
            for group in optimizer.param_groups:
                group["lr"] = lr * interval / (interval + 1)
        self.step_count, self.images_seen = state["step"], state["images_seen"]
        self.history = list(state["history"])
        self.pl_mean.copy_(state["pl_mean"])
        if self.rank == 0:
            torch.set_rng_state(state["torch_rng"])
        else:
            torch.manual_seed(self.cfg.seed * 1000 + self.rank + 1 + self.step_count)


def _snapshot(trainer: GanTrainer, io: GanLoopIO, stats: dict, img_per_s: float) -> None:
    cfg = trainer.cfg
    metrics = {"kimg": trainer.kimg, "step": trainer.step_count, "img_per_s": img_per_s, **stats}
    if io.rank != 0:
        io.report(metrics, None)
        return
    fake, drawn = generate_samples(
        trainer.G_ema,
        cfg,
        range(METRIC_SEED, METRIC_SEED + cfg.metric_images),
        class_index=cycled_classes(cfg.metric_images, cfg.num_classes),
    )
    metrics.update(sliced_wasserstein(io.real_for_metric(), fake))
    if io.sample_metrics is not None:
        metrics.update(io.sample_metrics(fake, drawn))
    trainer.history.append(metrics)
    with scratch_folder("gan") as folder:
        save_gan_checkpoint(Path(folder), trainer)
        classes = cycled_classes(len(GRID_SEEDS), cfg.num_classes)
        images, masks = generate_samples(trainer.G_ema, cfg, GRID_SEEDS, class_index=classes)
        grid = sample_grid(images, masks, cfg.mask_channels)
        write_png(Path(folder) / SAMPLES_FILE, grid)
        io.report(metrics, Path(folder))


def train_gan(cfg: GanConfig, io: GanLoopIO) -> dict:
    """Train until ``cfg.kimg`` thousand real images have been shown, snapshotting every
    ``cfg.snapshot_kimg`` (and once at the start, so the metric's starting value is on record)."""
    trainer = GanTrainer(cfg, io.device, io.rank)
    if io.resume_from is not None:
        trainer.load_state_dict(load_gan_state(io.resume_from))
    else:
        _snapshot(trainer, io, {}, 0.0)
    next_snapshot = (math.floor(trainer.kimg / cfg.snapshot_kimg) + 1) * cfg.snapshot_kimg
    started, images_at_start, stats = time.perf_counter(), trainer.images_seen, {}
    shown = started
    while trainer.kimg < cfg.kimg:
        batch = next(io.real_batches)
        labels = batch.get("label")
        stats = trainer.step(
            torch.as_tensor(batch["image"]).to(io.device),
            None if labels is None else torch.as_tensor(labels).to(io.device),
        )
        now = time.perf_counter()
        rate = (trainer.images_seen - images_at_start) / max(now - started, 1e-9)
        if trainer.kimg >= min(next_snapshot, cfg.kimg):
            _snapshot(trainer, io, stats, rate)
            next_snapshot += cfg.snapshot_kimg
            started, images_at_start = time.perf_counter(), trainer.images_seen
            shown = started
        elif io.progress is not None and io.rank == 0 and now - shown >= PROGRESS_SECONDS:
            io.progress(
                {"kimg": trainer.kimg, "step": trainer.step_count, "img_per_s": rate, **stats}
            )
            shown = now
    return {"kimg": trainer.kimg, **stats}

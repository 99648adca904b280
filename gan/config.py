"""The typed config of a GAN run, with the two named profiles; saved beside every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, replace

from defectforge.datasets.files import JsonConfig
from defectforge.gan.diffaug import parse_policy

# bf16 is mixed precision (autocast); it pays on GPUs and on CPUs with native bf16 (AVX512-BF16,
# AMX), and is slower than fp32 on CPUs without it.
PRECISIONS = ("fp32", "bf16")

PROFILES = {
    # Minutes on 2 CPU cores: 64 px, narrow layers, short mapping network.
    "cpu-small": dict(
        resolution=64,
        z_dim=256,
        w_dim=256,
        mapping_layers=2,
        channel_base=4096,
        channel_max=256,
        batch_size=8,
        snapshot_kimg=2.0,
        metric_images=256,
    ),
    # One GPU: the paper's working size.
    "gpu": dict(
        resolution=256,
        z_dim=512,
        w_dim=512,
        mapping_layers=8,
        channel_base=16384,
        channel_max=512,
        batch_size=32,
        snapshot_kimg=50.0,
        metric_images=2048,
        precision="bf16",
    ),
}


@dataclass(frozen=True)
class GanConfig(JsonConfig):
    kind = "GAN config"

    data: str
    channels: int
    classes: tuple[str, ...] = ()
    conditional: bool = False
    defect_class: str | None = None
    resolution: int = 64
    z_dim: int = 256
    w_dim: int = 256
    mapping_layers: int = 2
    channel_base: int = 4096
    channel_max: int = 256
    batch_size: int = 8
    kimg: float = 10.0
    g_lr: float = 0.0025
    d_lr: float = 0.0025
    r1_gamma: float = -1.0
    r1_interval: int = 16
    pl_weight: float = 0.0
    pl_interval: int = 4
    style_mixing_prob: float = 0.9
    ema_kimg: float = 2.5
    ema_rampup: float = 0.05
    diffaug: str = "color,translation,cutout"
    diffaug_strength: float = 1.0
    snapshot_kimg: float = 2.0
    metric_images: int = 256
    seed: int = 0
    workers: int = 1
    use_gpu: bool = False
    threads: int = 0
    precision: str = "fp32"

    def __post_init__(self):
        if self.resolution < 8 or self.resolution > 1024 or self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two in 8..1024, got {self.resolution}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        parse_policy(self.diffaug)
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        for name in ("batch_size", "workers", "r1_interval", "pl_interval", "mapping_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kimg <= 0 or self.snapshot_kimg <= 0:
            raise ValueError("kimg and snapshot_kimg must be > 0")
        if self.conditional and len(self.classes) < 2:
            raise ValueError("--conditional needs a dataset with at least two defect classes")
        if self.defect_class and self.classes and self.defect_class not in self.classes:
            raise ValueError(f"--class {self.defect_class!r} is not among {list(self.classes)}")
        if self.batch_size % 2 and self.batch_size > 1:
            raise ValueError("batch_size must be even (minibatch-std groups pair samples)")

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.conditional else 0

    @property
    def effective_r1_gamma(self) -> float:
        """StyleGAN2-ADA's heuristic when not set: 0.0002 * resolution^2 / batch."""
        if self.r1_gamma >= 0:
            return self.r1_gamma
        return 0.0002 * self.resolution**2 / (self.batch_size * self.workers)

    def with_profile(self, profile: str) -> GanConfig:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
        return replace(self, **PROFILES[profile])

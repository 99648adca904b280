"""The one typed config of a segmentation run; saved as JSON beside every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from defectforge.datasets.batches import BatchSpec
from defectforge.datasets.files import JsonConfig
from defectforge.datasets.mix import MixConfig
from defectforge.segmentation.losses import parse_loss
from defectforge.segmentation.models import check_architecture, check_encoder, min_input_size


@dataclass(frozen=True)
class SegConfig(JsonConfig):
    """A segmentation run. Data fields (classes, channels, mean, std) come from the manifest.

    The defaults are the CPU recipe: native-scale 128-px crops (whole images at evaluation),
    CE + Dice, half-strength paper augmentation, one-cycle cosine schedule.
    """

    kind = "segmentation config"

    data: str
    classes: tuple[str, ...]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    arch: str = "deeplabv3plus"
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    binary: bool = False
    image_size: int = 0
    crop_size: int = 128
    epochs: int = 10
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    loss: str = "ce+dice"
    tversky_alpha: float = 0.5
    focal_gamma: float = 2.0
    aug_strength: float = 0.5
    seed: int = 0
    workers: int = 1
    use_gpu: bool = False
    threads: int = 0
    max_steps_per_epoch: int = 0
    data_manifest_id: str = ""
    # Lazy real/synthetic mixing: a labelled synthetic dataset and the share of the train split
    # it makes up (see datasets/mix.py); val and test stay real.
    synthetic: str = ""
    synthetic_ratio: float = 0.0
    mix_seed: int = 0
    mix_per_class: bool = False

    def __post_init__(self):
        check_architecture(self.arch)
        check_encoder(self.encoder)
        parse_loss(self.loss)
        positive = ("epochs", "batch_size", "workers")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.aug_strength <= 1:
            raise ValueError(f"aug_strength must be in [0, 1], got {self.aug_strength}")
        if not 0 < self.tversky_alpha < 1:
            raise ValueError(f"tversky_alpha must be in (0, 1), got {self.tversky_alpha}")
        for name in ("image_size", "crop_size"):
            value = getattr(self, name)
            if value and (value < 32 or value % 32):
                raise ValueError(f"{name} must be 0 or a multiple of 32 (>= 32), got {value}")
        smallest = min_input_size(self.arch)
        for name in ("image_size", "crop_size"):
            value = getattr(self, name)
            if value and value < smallest:
                raise ValueError(
                    f"{self.arch} needs inputs of at least {smallest} px; "
                    f"set {name} to {smallest} or more"
                )
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        self.mix_config()

    def mix_config(self) -> MixConfig:
        """The mixing request (validated); a ratio without a synthetic dataset is an error."""
        if self.synthetic_ratio and not self.synthetic:
            raise ValueError("synthetic_ratio needs a labelled synthetic dataset (--synthetic)")
        return MixConfig(self.synthetic_ratio, self.mix_seed, self.mix_per_class)

    @property
    def output_classes(self) -> tuple[str, ...]:
        return ("background", "defect") if self.binary else self.classes

    @property
    def num_classes(self) -> int:
        return len(self.output_classes)

    def batch_spec(self) -> BatchSpec:
        return BatchSpec(
            self.channels,
            tuple(self.mean),
            tuple(self.std),
            self.image_size,
            self.crop_size,
            self.aug_strength,
            self.binary,
        )

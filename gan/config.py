"""The typed config of a GAN run, with the two named profiles; saved beside every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, replace

from defectforge.core.config import SEED, TypedConfig, option
from defectforge.core.errors import ConfigError
from defectforge.datasets.batches import MIRRORS
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
        pl_weight=2.0,  # path-length regularisation on, as in StyleGAN2's config F
    ),
}


MIN_RESOLUTION, MAX_RESOLUTION = 8, 1024


def _power_of_two(value: int) -> bool:
    return MIN_RESOLUTION <= value <= MAX_RESOLUTION and not value & (value - 1)


def _policy_ok(policy: str) -> bool:
    parse_policy(policy)
    return True


AT_LEAST_ONE = (lambda v: v >= 1, ">= 1")
POSITIVE = (lambda v: v > 0, "> 0")


# What a resumed run may change: how long and on what it trains, and where its data now lies
# (not --workers: they set the global batch, and with it the automatic R1 weight).
# Anything else would change the run from its latest snapshot on while its record (metrics.json,
# the kept snapshots' config) says the whole run had it, and would move the SWD it is scored by.
RESUMABLE_CHANGES = ("data", "kimg", "snapshot_kimg", "use_gpu", "threads", "precision")


@dataclass(frozen=True)
class GanConfig(TypedConfig):
    """A GAN run. Options a profile sets (``PROFILES``) default to the ``cpu-small`` values."""

    kind = "GAN config"

    data: str = option(help="the dataset (a `data build` folder)", cli=False)
    channels: int = option(cli=False, choices=(1, 3))
    classes: tuple[str, ...] = option((), cli=False)
    data_manifest_id: str = option("", cli=False)
    conditional: bool = option(False, "condition on defect class")
    defect_class: str | None = option(None, "train on one defect class only", flag="--class")
    resolution: int = option(64, "image side in px", _power_of_two, "a power of two in 8..1024")
    native_crops: bool = option(
        False,
        "learn random native-scale crops of side --resolution, not whole images resized: "
        "generated images then have the real images' scale",
    )
    defect_crops: float = option(
        0.0,
        "with --native-crops, the share of crops placed over a defect pixel (the masks say "
        "where): on large images with small defects, random crops are mostly background",
        lambda v: 0 <= v <= 1,
        "between 0 and 1",
    )
    masks: bool = option(
        False,
        "draw a mask beside each image (one channel per defect class): the discriminator judges "
        "image and mask together, and `gan generate` writes exact masks, no labeller needed",
    )
    mask_blur: float = option(
        1.0,
        "with --masks, blur (Gaussian sigma, px) of the mask channels the discriminator sees, "
        "real and drawn alike: exactly +-1 real masks would give them away",
        lambda v: v >= 0,
        ">= 0",
    )
    mirror: str = option(
        "none",
        "show the reals also flipped: x (left-right), xy (and up-down), dihedral (and turned "
        "by 90 degrees); only for surfaces whose defects look the same mirrored",
        choices=MIRRORS,
    )
    z_dim: int = option(256, "latent size", *AT_LEAST_ONE, cli=False)
    w_dim: int = option(256, "style size", *AT_LEAST_ONE, cli=False)
    mapping_layers: int = option(2, "mapping network depth", *AT_LEAST_ONE, cli=False)
    channel_base: int = option(4096, "channel budget", *AT_LEAST_ONE, cli=False)
    channel_max: int = option(256, "widest layer", *AT_LEAST_ONE, cli=False)
    batch_size: int = option(
        8, "images per batch and worker (even: minibatch-std pairs them)", *AT_LEAST_ONE
    )
    kimg: float = option(10.0, "thousands of real images shown", *POSITIVE)
    g_lr: float = option(0.0025, "generator learning rate", *POSITIVE, cli=False)
    d_lr: float = option(0.0025, "discriminator learning rate", *POSITIVE, cli=False)
    r1_gamma: float = option(
        -1.0, "R1 weight (negative: StyleGAN2-ADA's 0.0002 * resolution^2 / batch)"
    )
    r1_interval: int = option(16, "lazy R1 every N steps", *AT_LEAST_ONE, cli=False)
    pl_weight: float = option(0.0, "path-length regularisation (0: off)", lambda v: v >= 0, ">= 0")
    pl_interval: int = option(4, "lazy path length every N steps", *AT_LEAST_ONE, cli=False)
    style_mixing_prob: float = option(
        0.9, help="share of batches trained with two mixed latents", cli=False
    )
    ema_kimg: float = option(2.5, help="half-life of the EMA generator, in kimg", cli=False)
    ema_rampup: float = option(
        0.05, help="EMA ramp-up over the first images (StyleGAN2-ADA's)", cli=False
    )
    diffaug: str = option(
        "color,translation,cutout",
        "DiffAugment policy, e.g. color,translation,cutout ('' for none)",
        _policy_ok,
        "a comma-separated list of color, translation, cutout",
    )
    diffaug_strength: float = option(1.0, "DiffAugment strength", lambda v: v >= 0, ">= 0")
    snapshot_kimg: float = option(
        2.0, "snapshot, SWD and sample grid every this many kimg", *POSITIVE
    )
    metric_images: int = option(256, "images per SWD estimate", *AT_LEAST_ONE, cli=False)
    seed: int = option(0, "seed of weights, latents and batches", *SEED)
    workers: int = option(1, "Ray Train workers (gradients averaged)", *AT_LEAST_ONE)
    use_gpu: bool = option(False, "one GPU per worker")
    threads: int = option(
        0, "torch threads per worker (0: its share)", lambda v: v >= 0, ">= 0", cli=False
    )
    precision: str = option(
        "fp32",
        "bf16: mixed precision, ~1.4x on GPUs and CPUs with native bf16",
        choices=PRECISIONS,
    )

    def check(self) -> None:
        if self.conditional and len(self.classes) < 2:
            raise ConfigError("--conditional needs a dataset with at least two defect classes")
        if self.defect_class and self.classes and self.defect_class not in self.classes:
            raise ConfigError(f"--class {self.defect_class!r} is not among {list(self.classes)}")
        if self.masks and not self.classes:
            raise ConfigError("--masks needs a dataset whose masks name its defect classes")
        if self.defect_crops and not self.native_crops:
            raise ConfigError(
                f"--defect-crops {self.defect_crops:g} places native-scale crops: add --native-crops"
            )
        if self.batch_size % 2 and self.batch_size > 1:
            raise ConfigError(
                f"batch_size = {self.batch_size}: must be even (minibatch-std pairs samples)"
            )

    @property
    def mask_channels(self) -> int:
        """One channel per defect class when the generator draws masks (+1: the class is
        there, -1: it is not)."""
        return len(self.classes) if self.masks else 0

    @property
    def output_channels(self) -> int:
        return self.channels + self.mask_channels

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
            raise ConfigError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
        return replace(self, **PROFILES[profile])


@dataclass(frozen=True)
class GenerateConfig(TypedConfig):
    """Which samples `gan generate` (and a spec's generate section) draws."""

    kind = "generate options"

    count: int = option(500, "images to generate", lambda v: v >= 1, ">= 1")
    first_seed: int = option(0, "their seeds: first_seed .. first_seed + count - 1", *SEED)
    truncation: float = option(1.0, "truncation psi", lambda v: 0 < v <= 2, "in (0, 2]")
    class_name: str | None = option(None, "class of a conditional generator", flag="--class")

    def check(self) -> None:
        last = self.first_seed + self.count - 1
        if last >= 2**32:
            raise ConfigError(
                f"first_seed = {self.first_seed} with count = {self.count}: the last seed, "
                f"{last}, is above 2^32 - 1; lower first_seed or count"
            )

    def seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.count))

"""The one typed config of a segmentation run; saved as JSON beside every checkpoint.

Each option is declared once here; the command line's flags (`seg train`) and a study spec's
searchable keys are derived from these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass

from defectforge.core.config import SEED, TypedConfig, option, same_option
from defectforge.core.errors import ConfigError
from defectforge.datasets.augment import STRENGTH_HELP, valid_strength
from defectforge.datasets.batches import BatchSpec
from defectforge.datasets.images import INPUT_BITS
from defectforge.datasets.mix import MixConfig
from defectforge.segmentation.losses import parse_loss


def _size_ok(value: int) -> bool:
    return value == 0 or (value >= 32 and value % 32 == 0)


def _known(check):
    """A registry check (raising ConfigError for unknown names) as an option check."""

    def ok(value) -> bool:
        check(value)
        return True

    return ok


def _models():
    # smp (with timm and torchvision) loads when a config is checked, not when this module is
    # imported: the GAN and data processes that import it for its types start seconds sooner.
    from defectforge.segmentation import models

    return models


POSITIVE = (lambda v: v >= 1, "an integer >= 1")
# gan: the study's dataset.synthetic (GAN images, pseudo-labelled); copy_paste: dataset.copy_paste;
# gan_masks: dataset.gan_masks (images and exact masks drawn by one generator); combined:
# dataset.combined (two or more of those sets as one, `synth combine`).
SYNTHETIC_SOURCES = ("gan", "copy_paste", "gan_masks", "combined")


# The settings a run's checkpoints are bound to (the network's shape, the data it learnt):
# run again into the same folder, they continue only a run with the same ones.
CHECKPOINT_KEYS = ("arch", "encoder", "channels", "classes", "binary", "data_manifest_id")


@dataclass(frozen=True)
class SegConfig(TypedConfig):
    """A segmentation run. Data fields (classes, channels, mean, std) come from the manifest.

    The defaults are the CPU recipe: native-scale 128-px crops (whole images at evaluation),
    CE + Dice, half-strength paper augmentation, one-cycle cosine schedule.
    """

    kind = "segmentation config"

    data: str = option(help="the dataset (a `data build` folder)", cli=False)
    classes: tuple[str, ...] = option(cli=False)
    channels: int = option(cli=False, choices=(1, 3))
    mean: tuple[float, ...] = option(cli=False)
    std: tuple[float, ...] = option(cli=False)
    input_bits: int = option(8, cli=False, choices=INPUT_BITS)  # of the images it reads from files
    arch: str = option(
        "deeplabv3plus",
        "segmentation-models-pytorch architecture, e.g. deeplabv3plus, pan, unet",
        _known(lambda arch: _models().check_architecture(arch)),
        searchable=True,
    )
    encoder: str = option(
        "resnet18",
        "encoder (backbone) name",
        _known(lambda encoder: _models().check_encoder(encoder)),
        searchable=True,
    )
    encoder_weights: str | None = option(
        None, "'imagenet' (needs network) or an encoder state-dict file (a path or an s3:// URI)"
    )
    binary: bool = option(False, "train defect vs background")
    image_size: int = option(
        0, "resize to this square side (0: native scale)", _size_ok, "0 or a multiple of 32"
    )
    crop_size: int = option(
        128,
        "random training crops at native scale (0: whole images)",
        _size_ok,
        "0 or a multiple of 32",
        searchable=True,
    )
    defect_crop_prob: float = option(
        0.0,
        "share of training crops centred on a defect (rare, small defects in large images)",
        lambda v: 0 <= v <= 1,
        "in [0, 1]",
        searchable=True,
    )
    defect_oversample: int = option(
        1,
        "each image with a defect is seen this many times per epoch (1: once, as the others)",
        *POSITIVE,
        searchable=True,
    )
    epochs: int = option(10, "training epochs", *POSITIVE, searchable=True)
    batch_size: int = option(16, "images per batch and worker", *POSITIVE, searchable=True)
    lr: float = option(2e-3, "peak learning rate", lambda v: v > 0, "> 0", searchable=True)
    weight_decay: float = option(1e-4, "AdamW weight decay", lambda v: v >= 0, ">= 0")
    warmup_fraction: float = option(
        0.05, "share of steps warming up", lambda v: 0 <= v < 1, "in [0, 1)"
    )
    loss: str = option(
        "ce+dice",
        "weighted sum of ce, dice, focal, tversky, e.g. ce:0.3+tversky",
        _known(parse_loss),
        searchable=True,
    )
    tversky_alpha: float = option(
        0.5,
        "Tversky weight of false positives; 1-alpha weighs missed defects",
        lambda v: 0 < v < 1,
        "in (0, 1)",
        searchable=True,
    )
    focal_gamma: float = option(2.0, "focal loss focusing", lambda v: v >= 0, ">= 0")
    aug_strength: float = option(0.5, STRENGTH_HELP, valid_strength, "in [0, 1]", searchable=True)
    seed: int = option(0, "seed of weights, batches and augmentation", *SEED, searchable=True)
    workers: int = option(1, "Ray Train workers (data-parallel)", *POSITIVE)
    use_gpu: bool = option(False, "one GPU per worker")
    threads: int = option(
        0, "torch threads per worker (0: its share of the CPUs)", lambda v: v >= 0, ">= 0"
    )
    max_steps_per_epoch: int = option(
        0, "cap on steps per epoch, for smoke runs (0: whole epochs)", lambda v: v >= 0, ">= 0"
    )
    data_manifest_id: str = option("", cli=False)
    # Lazy real/synthetic mixing (datasets/mix.py decides which rows); val and test stay real.
    # The mix point's options are MixConfig's declarations, under the names a run uses.
    synthetic: str = same_option(MixConfig, "synthetic")
    synthetic_ratio: float = same_option(MixConfig, "ratio", 0.0, searchable=True)
    mix_seed: int = same_option(MixConfig, "seed")
    mix_per_class: bool = same_option(MixConfig, "per_class")
    real_count: int = same_option(MixConfig, "real_count", searchable=True)
    # Which of a study's synthetic sets a trial mixes in (the study sets ``synthetic`` from it).
    synthetic_source: str = option(
        "gan",
        help=(
            "the synthetic set a trial mixes in: `gan` (`dataset.synthetic`), `copy_paste` "
            "(`dataset.copy_paste`), `gan_masks` (`dataset.gan_masks`) or `combined` "
            "(`dataset.combined`: two or more of them as one)"
        ),
        cli=False,
        choices=SYNTHETIC_SOURCES,
        searchable=True,
    )

    def check(self) -> None:
        if self.seed + self.workers - 1 >= 2**32:  # worker k seeds NumPy with seed + k
            raise ConfigError(
                f"seed = {self.seed} with workers = {self.workers}: the last worker's seed is "
                "above 2^32 - 1; lower seed"
            )
        smallest = _models().min_input_size(self.arch)
        for name in ("image_size", "crop_size"):
            value = getattr(self, name)
            if value and value < smallest:
                raise ConfigError(
                    f"{name} = {value}: {self.arch} needs inputs of at least {smallest} px; "
                    f"set {name} to {smallest} or more"
                )
        if self.synthetic_ratio and not self.synthetic:
            raise ConfigError("synthetic_ratio needs a labelled synthetic dataset (--synthetic)")
        if self.real_count and not self.synthetic_ratio:
            raise ConfigError(
                f"real_count = {self.real_count}: keeps fewer real images so that synthetic ones "
                "replace them; give a synthetic_ratio > 0 with it"
            )

    @property
    def mix(self) -> MixConfig | None:
        """The mixing request; None without a synthetic set."""
        if not self.synthetic:
            return None
        return MixConfig(
            self.synthetic_ratio,
            self.mix_seed,
            self.mix_per_class,
            real_count=self.real_count,
            synthetic=self.synthetic,
        )

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
            min_input=_models().min_input_size(self.arch),
            defect_crop_prob=self.defect_crop_prob,
        )

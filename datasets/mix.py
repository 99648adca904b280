"""Which synthetic images join the real train split for a requested synthetic ratio.

``ratio = synthetic / (real + synthetic)`` over the train split (the paper's definition); val and
test never hold synthetic rows. The choice is a seeded, stable order over synthetic ids, so the
offline mixed dataset (`data mix`) and the lazy mix inside a training run pick exactly the same
images: both ask ``plan_for`` and nothing else decides which rows are mixed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from defectforge.core.config import SEED, TypedConfig, option
from defectforge.core.errors import DataError
from defectforge.core.storage import Location
from defectforge.datasets.contract import MANIFEST, read_split_table
from defectforge.datasets.leakage import check_no_leakage
from defectforge.datasets.manifest import SYNTHETIC, Manifest

RATIO_HELP = "synthetic share of the train split: synthetic / (real + synthetic)"
REAL_COUNT_HELP = (
    "real train images kept, drawn stratified (0: all); synthetic ones then replace the rest: "
    "the paper's rows of e.g. 100 real + 100 synthetic are real_count 100, ratio 0.5"
)


def valid_ratio(ratio: float) -> bool:
    return 0 <= ratio < 1


@dataclass(frozen=True)
class MixConfig(TypedConfig):
    kind = "mix config"

    ratio: float = option(help=RATIO_HELP, check=valid_ratio, valid="in [0, 1)")
    seed: int = option(0, "which synthetic images are chosen", *SEED)
    per_class: bool = option(False, "synthetic classes follow the real proportions")
    allow_fewer: bool = option(
        False, "too few synthetic images: use them all and record the achieved ratio"
    )
    real_count: int = option(
        0, REAL_COUNT_HELP, lambda v: v >= 0, ">= 0 (0: every real train image)"
    )
    synthetic: str = option("", "a labelled synthetic set (`synth label`) to mix in", path=True)


@dataclass(frozen=True)
class MixPlan:
    synthetic_ids: tuple[str, ...]
    real_rows: int
    requested_ratio: float
    real_ids: tuple[str, ...] = ()  # the real train rows kept; empty: all of them

    @property
    def achieved_ratio(self) -> float:
        total = self.real_rows + len(self.synthetic_ids)
        return len(self.synthetic_ids) / total if total else 0.0

    def summary(self) -> str:
        return (
            f"{self.real_rows} real + {len(self.synthetic_ids)} synthetic images (ratio "
            f"{self.achieved_ratio:.3f}, requested {self.requested_ratio})"
        )


class NotEnoughSynthetic(DataError):
    pass


def synthetic_count(real_count: int, ratio: float) -> int:
    """Synthetic images that make ``ratio`` of the train split next to ``real_count`` real ones."""
    return round(ratio * real_count / (1 - ratio))


def stable_order(ids: list[str], seed: int) -> list[str]:
    return sorted(ids, key=lambda i: hashlib.sha256(f"{seed}\0{i}".encode()).digest())


def share_by_class(total: int, real_by_class: dict[str, int]) -> dict[str, int]:
    """Split ``total`` over the classes in proportion to the real counts (largest remainder)."""
    weights = {c: n for c, n in real_by_class.items() if n > 0}
    whole = sum(weights.values())
    exact = {c: total * n / whole for c, n in weights.items()}
    shares = {c: int(v) for c, v in exact.items()}
    for c in sorted(exact, key=lambda c: exact[c] - shares[c], reverse=True)[
        : total - sum(shares.values())
    ]:
        shares[c] += 1
    return shares


def stratified_ids(classes: dict[str, str | None], count: int, seed: int) -> list[str]:
    """``count`` ids of ``classes`` (id -> defect class, None for defect-free) in the classes'
    proportions (largest remainder), each class's ids in a seeded stable order."""
    by_class: dict[str, list[str]] = {}
    for sample_id, name in classes.items():
        by_class.setdefault(name or "none", []).append(sample_id)
    quotas = share_by_class(count, {name: len(ids) for name, ids in by_class.items()})
    return sorted(
        chosen
        for name, quota in quotas.items()
        for chosen in stable_order(by_class[name], seed)[:quota]
    )


def plan_mix(
    real_rows: int,
    real_by_class: dict[str, int],
    candidates: dict[str, str | None],
    cfg: MixConfig,
    where: str | Path = "synthetic set",
) -> MixPlan:
    """Pick synthetic ids from ``candidates`` (id -> defect class) for ``cfg.ratio``.

    ``real_by_class`` counts real train images per defect class ("none" for defect-free images);
    with ``per_class`` the synthetic images follow the real images' defect-class proportions.
    """
    wanted = synthetic_count(real_rows, cfg.ratio)
    if cfg.per_class:
        defect_counts = {c: n for c, n in real_by_class.items() if c != "none"}
        quotas = share_by_class(wanted, defect_counts) if wanted else {}
    else:
        quotas = {None: wanted}
    chosen: list[str] = []
    for cls, quota in quotas.items():
        pool = [i for i, c in candidates.items() if cls is None or c == cls]
        if quota > len(pool) and not cfg.allow_fewer:
            what = f"{cls!r} synthetic images" if cls else "synthetic images"
            raise NotEnoughSynthetic(
                where,
                f"ratio {cfg.ratio} over {real_rows} real train images needs {quota} {what}, "
                f"only {len(pool)} exist",
                "generate and label more, lower the ratio, or pass --allow-fewer to use them all",
            )
        chosen += stable_order(pool, cfg.seed)[:quota]
    if wanted and not chosen:
        raise NotEnoughSynthetic(
            where,
            f"ratio {cfg.ratio} needs {wanted} synthetic images and none fits"
            + (" a real defect class" if cfg.per_class else "")
            + ", so the mix would be the real set alone",
            "generate and label images for this set, or use the real dataset itself as ratio 0",
        )
    return MixPlan(tuple(sorted(chosen)), real_rows, cfg.ratio)


SYNTHETIC_SETS = (
    "labelled synthetic set (`synth label`, `synth copy-paste`, `synth combine` or `gan "
    "generate` of a --masks run)"
)


def check_compatible(real: str | Path, synthetic: str | Path) -> tuple[Manifest, Manifest]:
    """Both manifests, after checking that the synthetic set is labelled, fits the real one and
    was not made from the real one's val or test images."""
    real_manifest, synthetic_manifest = Manifest.load(real), _synthetic_manifest(synthetic)
    where = Location.of(synthetic) / MANIFEST
    if real_manifest.source == SYNTHETIC:
        raise DataError(
            Location.of(real) / MANIFEST,
            "is a synthetic set, and the real side of a mix holds real images",
            "pass a dataset of `data build` or `data subset` as the real set",
        )
    if synthetic_manifest.source != SYNTHETIC:
        raise DataError(
            where,
            f"is a dataset of real images (source {synthetic_manifest.source}), not a synthetic "
            "set",
            f"pass a {SYNTHETIC_SETS} as the synthetic set",
        )
    if synthetic_manifest.labelling is None:
        raise DataError(
            where,
            "these synthetic images have no masks yet",
            "label them with `defectforge synth label` and mix the labelled folder",
        )
    for key, fix in (
        ("channels", "label images of the real set's channel count"),
        ("classes", "label with a model trained on this real set (or both --binary)"),
    ):
        if getattr(synthetic_manifest, key) != getattr(real_manifest, key):
            raise DataError(
                where,
                f"synthetic {key} {list(_listed(getattr(synthetic_manifest, key)))} differ from "
                f"the real set's {list(_listed(getattr(real_manifest, key)))}",
                fix,
            )
    check_no_leakage(real, real_manifest, synthetic, synthetic_manifest)
    return real_manifest, synthetic_manifest


def _synthetic_manifest(synthetic: str | Path) -> Manifest:
    """The synthetic set's manifest; a folder of images is not one yet: it is labelled first."""
    if not (Location.of(synthetic) / MANIFEST).is_file():
        raise DataError(
            Location.of(synthetic),
            "holds no synthetic set (no manifest.json)",
            f"pass a {SYNTHETIC_SETS}; a folder of images becomes one with `defectforge synth "
            "label --images FOLDER --labeller RUN --out OUT`",
        )
    return Manifest.load(synthetic)


def _listed(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def train_classes(root: str | Path) -> dict[str, str | None]:
    """Every train id of a dataset and its defect class."""
    table = read_split_table(root, "train", columns=["id", "defect_class"])
    if table is None:
        return {}
    return dict(zip(table["id"].to_pylist(), table["defect_class"].to_pylist(), strict=True))


def _kept_real(real: str | Path, total: int, cfg: MixConfig) -> tuple[str, ...]:
    """The real train ids a replace-mode mix keeps (stratified, seeded); () keeps them all."""
    if not cfg.real_count:
        return ()
    if cfg.real_count > total:
        raise DataError(
            Location.of(real) / MANIFEST,
            f"real_count {cfg.real_count} is more than the {total} real train images",
            f"ask for at most {total}, or 0 for all of them",
        )
    return tuple(stratified_ids(train_classes(real), cfg.real_count, cfg.seed))


@dataclass(frozen=True)
class Mix:
    """A planned mix: both manifests, the synthetic ids by class, and the chosen ids."""

    real: Manifest
    synthetic: Manifest
    candidates: dict[str, str | None]
    plan: MixPlan


def plan_for(real: str | Path, synthetic: str | Path, cfg: MixConfig) -> Mix:
    """The mix of ``synthetic`` into ``real``'s train split; a NotEnoughSynthetic before any
    work when the ratio needs more images than exist."""
    real_manifest, synthetic_manifest = check_compatible(real, synthetic)
    train = real_manifest.counts["train"]
    real_ids = _kept_real(real, train.total, cfg)
    candidates = train_classes(synthetic)
    where = Location.of(synthetic) / MANIFEST
    plan = plan_mix(len(real_ids) or train.total, train.by_class, candidates, cfg, where)
    return Mix(real_manifest, synthetic_manifest, candidates, replace(plan, real_ids=real_ids))

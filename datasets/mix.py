"""Which synthetic images join the real train split for a requested synthetic ratio.

``ratio = synthetic / (real + synthetic)`` over the train split (the paper's definition); val and
test never hold synthetic rows. The choice is a seeded, stable order over synthetic ids, so the
offline mixed dataset (`data mix`) and the lazy mix inside a training run pick exactly the same
images: both ask ``plan_for`` and nothing else decides which rows are mixed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from defectforge.datasets.config import TypedConfig, option
from defectforge.datasets.contract import MANIFEST, split_dir, split_files
from defectforge.datasets.errors import DataError
from defectforge.datasets.manifest import Manifest

RATIO_HELP = "synthetic share of the train split: synthetic / (real + synthetic)"


def valid_ratio(ratio: float) -> bool:
    return 0 <= ratio < 1


@dataclass(frozen=True)
class MixConfig(TypedConfig):
    kind = "mix config"

    ratio: float = option(help=RATIO_HELP, check=valid_ratio, valid="in [0, 1)")
    seed: int = option(0, "which synthetic images are chosen")
    per_class: bool = option(False, "synthetic classes follow the real proportions")
    allow_fewer: bool = option(
        False, "too few synthetic images: use them all and record the achieved ratio"
    )


@dataclass(frozen=True)
class MixPlan:
    synthetic_ids: tuple[str, ...]
    real_count: int
    requested_ratio: float

    @property
    def achieved_ratio(self) -> float:
        total = self.real_count + len(self.synthetic_ids)
        return len(self.synthetic_ids) / total if total else 0.0

    def summary(self) -> str:
        return (
            f"{self.real_count} real + {len(self.synthetic_ids)} synthetic images (ratio "
            f"{self.achieved_ratio:.3f}, requested {self.requested_ratio})"
        )


class NotEnoughSynthetic(DataError):
    pass


def synthetic_count(real_count: int, ratio: float) -> int:
    """Synthetic images that make ``ratio`` of the train split next to ``real_count`` real ones."""
    return round(ratio * real_count / (1 - ratio))


def _stable_order(ids: list[str], seed: int) -> list[str]:
    return sorted(ids, key=lambda i: hashlib.sha256(f"{seed}\0{i}".encode()).digest())


def _share_by_class(total: int, real_by_class: dict[str, int]) -> dict[str, int]:
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


def plan_mix(
    real_count: int,
    real_by_class: dict[str, int],
    candidates: dict[str, str | None],
    cfg: MixConfig,
    where: str | Path = "synthetic set",
) -> MixPlan:
    """Pick synthetic ids from ``candidates`` (id -> defect class) for ``cfg.ratio``.

    ``real_by_class`` counts real train images per defect class ("none" for defect-free images);
    with ``per_class`` the synthetic images follow the real images' defect-class proportions.
    """
    wanted = synthetic_count(real_count, cfg.ratio)
    if cfg.per_class:
        defect_counts = {c: n for c, n in real_by_class.items() if c != "none"}
        quotas = _share_by_class(wanted, defect_counts) if wanted else {}
    else:
        quotas = {None: wanted}
    chosen: list[str] = []
    for cls, quota in quotas.items():
        pool = [i for i, c in candidates.items() if cls is None or c == cls]
        if quota > len(pool) and not cfg.allow_fewer:
            what = f"{cls!r} synthetic images" if cls else "synthetic images"
            raise NotEnoughSynthetic(
                where,
                f"ratio {cfg.ratio} over {real_count} real train images needs {quota} {what}, "
                f"only {len(pool)} exist",
                "generate and label more, lower the ratio, or pass --allow-fewer to use them all",
            )
        chosen += _stable_order(pool, cfg.seed)[:quota]
    return MixPlan(tuple(sorted(chosen)), real_count, cfg.ratio)


def check_compatible(real: str | Path, synthetic: str | Path) -> tuple[Manifest, Manifest]:
    """Both manifests, after checking that the synthetic set is labelled and fits the real one."""
    real_manifest, synthetic_manifest = Manifest.load(real), Manifest.load(synthetic)
    where = Path(synthetic) / MANIFEST
    if synthetic_manifest.section("labelling") is None:
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
    return real_manifest, synthetic_manifest


def _listed(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def synthetic_candidates(synthetic: str | Path) -> dict[str, str | None]:
    """Every labelled synthetic id and its defect class."""
    if not split_dir(synthetic, "train").is_dir():
        return {}
    table = pq.read_table(split_files(synthetic, "train"), columns=["id", "defect_class"])
    return dict(zip(table["id"].to_pylist(), table["defect_class"].to_pylist(), strict=True))


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
    candidates = synthetic_candidates(synthetic)
    where = Path(synthetic) / MANIFEST
    plan = plan_mix(train.total, train.by_class, candidates, cfg, where)
    return Mix(real_manifest, synthetic_manifest, candidates, plan)

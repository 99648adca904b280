"""Which synthetic images join the real train split for a requested synthetic ratio. No I/O.

``ratio = synthetic / (real + synthetic)`` over the train split (the paper's definition); val and
test never hold synthetic rows. The choice is a seeded, stable order over synthetic ids, so the
offline mixed dataset and the lazy mix inside a training run pick exactly the same images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from defectforge.datasets.files import JsonConfig


@dataclass(frozen=True)
class MixConfig(JsonConfig):
    kind = "mix config"

    ratio: float
    seed: int = 0
    per_class: bool = False
    allow_fewer: bool = False

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(
                f"synthetic ratio must be in [0, 1), got {self.ratio}; "
                "it is synthetic / (real + synthetic) of the train split"
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


class NotEnoughSynthetic(ValueError):
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
                f"ratio {cfg.ratio} over {real_count} real train images needs {quota} {what}, "
                f"only {len(pool)} exist; generate and label more, lower the ratio, or pass "
                "--allow-fewer to use them all"
            )
        chosen += _stable_order(pool, cfg.seed)[:quota]
    return MixPlan(tuple(sorted(chosen)), real_count, cfg.ratio)

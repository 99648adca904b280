"""Real + labelled synthetic train rows at a requested ratio, offline (a dataset) or lazily (a Ray
Dataset inside a training run). Both use ``plan_mix``, so they pick the same synthetic images."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from defectforge.datasets.contract import (
    MANIFEST,
    SPLITS,
    combined_digest,
    publish_dir,
    read_manifest,
    split_dir,
)
from defectforge.datasets.errors import DataError
from defectforge.datasets.files import write_json_atomic
from defectforge.datasets.mix import MixConfig, MixPlan, plan_mix
from defectforge.trainables.data_jobs import ROWS_PER_FILE, augment_parquet, read_split
from defectforge.trainables.runtime import ensure_ray


def check_compatible(real: str | Path, synthetic: str | Path) -> tuple[dict, dict]:
    """Both manifests, after checking that the synthetic set is labelled and fits the real one."""
    real_manifest, synthetic_manifest = read_manifest(real), read_manifest(synthetic)
    where = Path(synthetic) / MANIFEST
    if "labelling" not in synthetic_manifest:
        raise DataError(
            where,
            "these synthetic images have no masks yet",
            "label them with `defectforge synth label` and mix the labelled folder",
        )
    for key, fix in (
        ("channels", "label images of the real set's channel count"),
        ("classes", "label with a model trained on this real set (or both --binary)"),
    ):
        if synthetic_manifest[key] != real_manifest[key]:
            raise DataError(
                where,
                f"synthetic {key} {synthetic_manifest[key]} differ from the real set's "
                f"{real_manifest[key]}",
                fix,
            )
    return real_manifest, synthetic_manifest


def _candidates(synthetic: str | Path) -> dict[str, str | None]:
    folder = split_dir(synthetic, "train")
    if not folder.is_dir():
        return {}
    table = pq.read_table(folder, columns=["id", "defect_class"])
    return dict(zip(table["id"].to_pylist(), table["defect_class"].to_pylist(), strict=True))


@dataclass(frozen=True)
class _Mix:
    """What both mixing paths need: the two manifests, the synthetic ids by class, the plan."""

    real_manifest: dict
    synthetic_manifest: dict
    candidates: dict[str, str | None]
    plan: MixPlan


def _plan(real: str | Path, synthetic: str | Path, cfg: MixConfig) -> _Mix:
    real_manifest, synthetic_manifest = check_compatible(real, synthetic)
    train = real_manifest["counts"]["train"]
    candidates = _candidates(synthetic)
    plan = plan_mix(train["total"], train["by_class"], candidates, cfg)
    return _Mix(real_manifest, synthetic_manifest, candidates, plan)


def plan_for(real: str | Path, synthetic: str | Path, cfg: MixConfig) -> MixPlan:
    """Which synthetic images a mix would take; raises NotEnoughSynthetic before any work."""
    return _plan(real, synthetic, cfg).plan


def _only_ids(table: pa.Table, ids: tuple[str, ...]) -> pa.Table:
    return table.filter(pc.is_in(table["id"], value_set=pa.array(ids, pa.string())))


def _union(real: str | Path, synthetic: str | Path, plan: MixPlan) -> ray.data.Dataset:
    train = read_split(real, "train")
    if not plan.synthetic_ids:
        return train
    chosen = read_split(synthetic, "train").map_batches(
        partial(_only_ids, ids=plan.synthetic_ids), batch_format="pyarrow"
    )
    return train.union(chosen)


def mixed_train(
    real: str | Path, synthetic: str | Path, cfg: MixConfig
) -> tuple[ray.data.Dataset, MixPlan]:
    """The real train split plus the planned synthetic rows, as one Ray Dataset."""
    plan = plan_for(real, synthetic, cfg)
    return _union(real, synthetic, plan), plan


def _mixed_counts(real_train: dict, plan: MixPlan, candidates: dict) -> dict:
    by_class = Counter(real_train["by_class"])
    by_class.update(candidates[i] or "none" for i in plan.synthetic_ids)
    by_source = dict(real_train["by_source"])
    if plan.synthetic_ids:
        by_source["synthetic"] = len(plan.synthetic_ids)
    return {
        "total": real_train["total"] + len(plan.synthetic_ids),
        "by_source": by_source,
        "by_class": dict(by_class),
    }


def _mix_manifest(real: dict, synthetic: dict, plan: MixPlan, cfg: MixConfig, counts: dict) -> dict:
    mix = {
        **{key: value for key, value in asdict(cfg).items() if key != "ratio"},
        "requested_ratio": cfg.ratio,
        "achieved_ratio": plan.achieved_ratio,
        "real_images": plan.real_count,
        "synthetic_images": len(plan.synthetic_ids),
        "real_dataset_id": real["dataset_id"],
        "synthetic_dataset_id": synthetic["dataset_id"],
        "synthetic_labelling": {
            k: synthetic["labelling"][k] for k in ("labeller", "generator", "config")
        },
    }
    # No synthetic rows: the same content as the real set, so the same identity.
    dataset_id = real["dataset_id"]
    if plan.synthetic_ids:
        dataset_id = combined_digest(
            {"real": real["dataset_id"], "synthetic": repr(plan.synthetic_ids)}
        )[:16]
    return {
        **real,
        "counts": {**real["counts"], "train": counts},
        "mix": mix,
        "dataset_id": dataset_id,
    }


def _write_mix(real: str | Path, synthetic: str | Path, cfg: MixConfig, staging: Path) -> dict:
    mix = _plan(real, synthetic, cfg)
    _union(real, synthetic, mix.plan).write_parquet(
        str(staging / "train"), min_rows_per_file=ROWS_PER_FILE
    )
    for split in SPLITS[1:]:
        if mix.real_manifest["counts"][split]["total"]:
            shutil.copytree(split_dir(real, split), staging / split)
    counts = _mixed_counts(mix.real_manifest["counts"]["train"], mix.plan, mix.candidates)
    manifest = _mix_manifest(mix.real_manifest, mix.synthetic_manifest, mix.plan, cfg, counts)
    write_json_atomic(staging / MANIFEST, manifest)
    return manifest


def mix_datasets(
    real: str | Path,
    synthetic: str | Path,
    cfg: MixConfig,
    out: str | Path,
    augment_factor: int = 1,
    augment_strength: float = 1.0,
    overwrite: bool = False,
) -> dict:
    """Write the mixed dataset (val and test copied from the real set, never synthetic); with
    ``augment_factor`` > 1 its train split is then expanded offline as by `data augment`."""
    if augment_factor < 1:
        raise ValueError(
            f"--augment-factor must be >= 1 (1: no augmentation), got {augment_factor}"
        )
    ensure_ray()
    if augment_factor == 1:
        with publish_dir(out, overwrite) as staging:
            return _write_mix(real, synthetic, cfg, staging)
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.mix-", dir=out.parent) as scratch:
        _write_mix(real, synthetic, cfg, Path(scratch))
        return augment_parquet(
            scratch, out, augment_factor, augment_strength, cfg.seed, overwrite=overwrite
        )

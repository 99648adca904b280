"""Seeds of one comparison run as several compare studies, pooled into one answer.

A compare study trains every arm with seeds ``final.first_seed``, +1, ...; a second study with
the same data and settings from a later ``first_seed`` adds seeds to some or all of its arms.
Pooling checks that the studies asked the same question (the same datasets by manifest id, the
same settings but for seeds, arms, threads and where they ran), refuses a seed run twice for
one arm or a seed an arm's ratio-0 baseline lacks, and recomputes every arm's interval and
paired difference over all its seeds. No Ray here.
"""

from __future__ import annotations

from pathlib import Path

from defectforge.core.errors import DataError
from defectforge.core.files import write_json_atomic
from defectforge.core.outputs import publish_dir
from defectforge.core.storage import absolute_location
from defectforge.studies.compare import (
    COMPARE_FILE,
    arm_entry,
    comparison_of,
    comparison_section,
    plot_comparison,
)
from defectforge.studies.results import STUDY_FILE
from defectforge.studies.spec_schema import MIX_DEFAULTS
from defectforge.studies.store import StudyStore

POOL_REPORT = "report.md"
# What may differ between studies whose seeds pool: how or where they ran, which seeds they drew
# and which arms they ran; and the stages, since the datasets they made are compared by id.
FREE_SECTIONS = ("name", "description", "expected_runtime", "storage_path", "resources", "stages")
FREE_KEYS = {
    "final": ("seeds", "first_seed"),
    "training": ("threads",),
    "search": ("max_concurrent_trials",),
    "search_space": ("arms",),
}


def _question(study: dict) -> dict:
    """What must match for two studies' seeds to pool (the datasets are compared apart)."""
    spec = {k: v for k, v in study["spec"].items() if k not in FREE_SECTIONS}
    for section, free in FREE_KEYS.items():
        spec[section] = {k: v for k, v in spec.get(section, {}).items() if k not in free}
    spec.pop("dataset", None)  # compared by manifest id: a moved folder is the same data
    return spec


def _same_data(ours: dict, theirs: dict) -> bool:
    """The same real dataset, and the same synthetic sets where both studies used one (a study
    that ran only copy-paste arms lists no GAN set)."""
    shared = set(ours) & set(theirs)
    return "real" in shared and all(ours[name] == theirs[name] for name in shared)


def _arm_key(arm: dict) -> tuple:
    """An arm with its unset mix options filled in: the same arm in every study's spelling."""
    full = {**MIX_DEFAULTS, **{k: v for k, v in arm.items() if v is not None}}
    if not full["synthetic_ratio"]:
        full.pop("synthetic_source")  # a ratio-0 arm mixes nothing in, from any source
    return tuple(sorted(full.items()))


def _read(root: str) -> tuple[dict, dict]:
    store = StudyStore(root)
    if not store.exists(STUDY_FILE):
        raise DataError(root, "not a study folder", "pass folders made by `study run`")
    algorithm = store.read_json(STUDY_FILE)["spec"]["search"]["algorithm"]
    if algorithm != "compare":
        raise DataError(
            root,
            f"a study of search.algorithm {algorithm}: only compare studies pool",
            "leave it out",
        )
    if not store.exists(COMPARE_FILE):
        raise DataError(
            root,
            f"no {COMPARE_FILE} yet: the compare study has not finished",
            f"finish it with `defectforge study resume {root}`, or leave it out",
        )
    return store.read_json(STUDY_FILE), store.read_json(COMPARE_FILE)


def _merged_per_image(roots: list[str], parts: list[tuple[int, list]]) -> list[float | None]:
    """Per-image IoUs over every seed: each study's per-image mean weighted by its seed count
    (compare.json keeps means, not per-seed values; an image no seed of a study scored
    leaves that study out)."""
    if len({len(per_image) for _, per_image in parts}) > 1:
        raise DataError(
            ", ".join(roots), "their test splits hold different numbers of images",
            "pool only studies scored on the same test split",
        )  # fmt: skip
    merged = []
    for scores in zip(*(per_image for _, per_image in parts), strict=True):
        known = [(count, s) for (count, _), s in zip(parts, scores, strict=True) if s is not None]
        weight = sum(count for count, _ in known)
        merged.append(sum(count * s for count, s in known) / weight if known else None)
    return merged


def _require_baselines(comparison: dict, roots: list[str]) -> None:
    """Every seed of an arm with synthetic images has its baseline's seed: a pooled seed the
    ratio-0 arm never ran would silently drop out of the paired difference."""
    for arm in comparison["arms"]:
        paired = next((p for p in comparison["paired"] if p["arm"] == arm["label"]), None)
        if paired is None:
            continue
        missing = sorted(
            {s["seed"] for s in arm["seeds"]} - {d["seed"] for d in paired["differences"]}
        )
        if missing:
            raise DataError(
                ", ".join(roots),
                f"arm {arm['label']!r} ran seed(s) {missing} that its baseline "
                f"{paired['baseline']!r} did not",
                "run the ratio-0 arm with the same seeds in the study that adds them",
            )


def pool_comparisons(roots: list[str]) -> dict:
    """compare.json over the seeds of every study in ``roots``."""
    if len(roots) < 2:
        raise DataError(roots[0] if roots else "study pool", "pooling needs two studies or more",
                        "name every compare study whose seeds belong together")  # fmt: skip
    studies = [_read(root) for root in roots]
    first_study = studies[0][0]
    keys: set[str] = set()
    arms: dict[tuple, dict] = {}
    for root, (study, comparison) in zip(roots, studies, strict=True):
        if _question(study) != _question(first_study) or not _same_data(
            study["dataset_ids"], first_study["dataset_ids"]
        ):
            raise DataError(
                root,
                f"asks another question than {roots[0]} (its datasets or settings differ beyond "
                "seeds, threads, arms and resources)",
                "pool only studies of one spec that differ in final.first_seed and arms",
            )
        keys.update(comparison["keys"])
        for arm in comparison["arms"]:
            pooled = arms.setdefault(_arm_key(arm["arm"]), {"arm": arm["arm"], "parts": []})
            seen = {s["seed"] for part in pooled["parts"] for s in part[2]}
            twice = seen & {s["seed"] for s in arm["seeds"]}
            if twice:
                raise DataError(
                    root,
                    f"arm {arm['label']!r} ran seed(s) {sorted(twice)} in another study too",
                    "give the later study a final.first_seed past the earlier one's seeds",
                )
            pooled["parts"].append((len(arm["seeds"]), arm["per_image_binary_iou"], arm["seeds"]))
    entries = [
        arm_entry(
            # Spelt with every study's keys, as one compare study spells its arms.
            {key: pooled["arm"].get(key) for key in sorted(keys)},
            sorted((s for part in pooled["parts"] for s in part[2]), key=lambda s: s["seed"]),
            _merged_per_image(roots, [(n, per_image) for n, per_image, _ in pooled["parts"]]),
        )
        for pooled in arms.values()
    ]
    comparison = comparison_of(sorted(keys), entries)
    _require_baselines(comparison, roots)
    return {**comparison, "studies": [absolute_location(root) for root in roots]}


def write_pool(roots: list[str], out: str | Path, overwrite: bool = False) -> dict:
    """The pooled compare.json, report.md and its plots in ``out`` (published whole)."""
    comparison = pool_comparisons(roots)
    with publish_dir(out, overwrite, kind="pooled comparison") as folder:
        write_json_atomic(folder / COMPARE_FILE, comparison)
        plot_comparison(comparison, folder)
        lines = ["# Pooled comparison", "", *(f"- `{root}`" for root in roots), ""]
        # The folder is published whole, so plain writes into it are safe.
        (folder / POOL_REPORT).write_text("\n".join(lines + comparison_section(comparison)))
    return comparison

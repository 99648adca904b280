"""Seeds of one comparison run as several compare studies, pooled into one answer.

A compare study trains every arm with seeds ``final.first_seed``, +1, ...; a second study with
the same data and settings from a later ``first_seed`` adds seeds to some or all of its arms.
Pooling checks that the studies asked the same question (the same datasets by manifest id, the
same settings but for seeds, threads and where they ran), refuses a seed run twice for one arm,
and recomputes every arm's interval and paired difference over all its seeds. No Ray here.
"""

from __future__ import annotations

from pathlib import Path

from defectforge.datasets.errors import DataError
from defectforge.datasets.files import write_json_atomic
from defectforge.datasets.outputs import publish_dir
from defectforge.studies.compare import (
    COMPARE_FILE,
    arm_entry,
    comparison_of,
    comparison_section,
    plot_paired_differences,
    plot_per_image_iou,
)
from defectforge.studies.results import STUDY_FILE
from defectforge.studies.spec import MIX_DEFAULTS
from defectforge.studies.store import StudyStore

POOL_REPORT = "report.md"
# Spec sections and keys that may differ between studies whose seeds pool: they change how or
# where a study ran, or which seeds it drew, not what each seed computes.
FREE_SECTIONS = ("name", "description", "expected_runtime", "storage_path", "resources", "final")
FREE_TRAINING = ("threads",)
FREE_SEARCH = ("max_concurrent_trials",)


def _question(study: dict) -> dict:
    """What must match for two studies' seeds to pool."""
    spec = {k: v for k, v in study["spec"].items() if k not in FREE_SECTIONS}
    spec["search_space"] = {k: v for k, v in spec.get("search_space", {}).items() if k != "arms"}
    spec["training"] = {k: v for k, v in spec.get("training", {}).items() if k not in FREE_TRAINING}
    spec["search"] = {k: v for k, v in spec.get("search", {}).items() if k not in FREE_SEARCH}
    spec.pop("dataset", None)  # compared by manifest id: a moved folder is the same data
    return {"spec": spec, "dataset_ids": study["dataset_ids"]}


def _arm_key(arm: dict) -> tuple:
    """An arm with its unset mix options filled in: the same arm in every study's spelling."""
    full = {**MIX_DEFAULTS, **{k: v for k, v in arm.items() if v is not None}}
    if not full["synthetic_ratio"]:
        full.pop("synthetic_source")  # a ratio-0 arm mixes nothing in, from any source
    return tuple(sorted(full.items()))


def _read(root: str) -> tuple[dict, dict]:
    store = StudyStore(root)
    if not store.exists(COMPARE_FILE):
        raise DataError(
            root,
            f"no {COMPARE_FILE}: only a finished compare study (search.algorithm: compare) pools",
            "finish it with `defectforge study resume`, or leave it out",
        )
    return store.read_json(STUDY_FILE), store.read_json(COMPARE_FILE)


def _merged_per_image(parts: list[tuple[int, list]]) -> list[float | None]:
    """Per-image IoUs averaged over every seed: each study's mean weighted by its seed count."""
    merged = []
    for scores in zip(*(per_image for _, per_image in parts), strict=True):
        known = [(count, s) for (count, _), s in zip(parts, scores, strict=True) if s is not None]
        weight = sum(count for count, _ in known)
        merged.append(sum(count * s for count, s in known) / weight if known else None)
    return merged


def pool_comparisons(roots: list[str]) -> dict:
    """compare.json over the seeds of every study in ``roots``."""
    if len(roots) < 2:
        raise DataError(roots[0] if roots else "study pool", "pooling needs two studies or more",
                        "name every compare study whose seeds belong together")  # fmt: skip
    studies = [_read(root) for root in roots]
    first_question = _question(studies[0][0])
    keys: set[str] = set()
    arms: dict[tuple, dict] = {}
    for root, (study, comparison) in zip(roots, studies, strict=True):
        if _question(study) != first_question:
            raise DataError(
                root,
                f"asks another question than {roots[0]} (its datasets or settings differ beyond "
                "seeds, threads and resources)",
                "pool only studies of one spec that differ in final.first_seed",
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
            pooled["arm"],
            sorted((s for part in pooled["parts"] for s in part[2]), key=lambda s: s["seed"]),
            _merged_per_image([(count, per_image) for count, per_image, _ in pooled["parts"]]),
        )
        for pooled in arms.values()
    ]
    return {**comparison_of(sorted(keys), entries), "studies": list(roots)}


def write_pool(roots: list[str], out: str | Path, overwrite: bool = False) -> dict:
    """The pooled compare.json, report.md and its two plots in ``out`` (published whole)."""
    comparison = pool_comparisons(roots)
    with publish_dir(out, overwrite, kind="pooled comparison") as folder:
        write_json_atomic(folder / COMPARE_FILE, comparison)
        plot_per_image_iou(comparison, folder / "per_image_iou.png")
        plot_paired_differences(comparison, folder / "paired_differences.png")
        lines = ["# Pooled comparison", "", *(f"- `{root}`" for root in roots), ""]
        # The folder is published whole, so plain writes into it are safe.
        (folder / POOL_REPORT).write_text("\n".join(lines + comparison_section(comparison)))
    return comparison

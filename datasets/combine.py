"""Two or more labelled synthetic sets as one: the arm that mixes GAN and copy-paste images
together.

A study trial mixes in one synthetic set; to ask whether GAN images add anything on top of
copy-paste ones, the two are combined first. Each set gives the same number of rows (by
default the smallest set's count, chosen in a seeded stable order), so a mix drawing from the
combination takes about as many of each. Every row keeps its id (the makers' ids do not meet:
copy-paste, generated and drawn sets name theirs apart) and the combination records what each
set's makers learnt from, so the leakage check sees all of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa

from defectforge.core.config import TypedConfig, option
from defectforge.core.errors import DataError
from defectforge.core.outputs import check_output
from defectforge.core.storage import Location
from defectforge.datasets.contract import MANIFEST, only_ids, read_split_table
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.mix import stable_order
from defectforge.datasets.writer import write_dataset


@dataclass(frozen=True)
class CombineConfig(TypedConfig):
    kind = "combine config"

    count_each: int = option(
        0, "rows taken from each set (0: the smallest set's count)", lambda v: v >= 0, ">= 0"
    )
    seed: int = option(0, "which rows a larger set gives")


def _labelled(path: str) -> Manifest:
    manifest = Manifest.load(path)
    if manifest.labelling is None:
        raise DataError(
            Location.of(path) / MANIFEST,
            "this set has no masks (unlabelled generated images, or a real dataset)",
            "combine labelled synthetic sets: `synth label`, `synth copy-paste` or a --masks "
            "GAN's `gan generate` output",
        )
    return manifest


def _check_alike(sets: list[str], manifests: list[Manifest]) -> None:
    first = manifests[0]
    for path, manifest in zip(sets[1:], manifests[1:], strict=True):
        for key in ("channels", "classes", "binary"):
            if getattr(manifest, key) != getattr(first, key):
                raise DataError(
                    Location.of(path) / MANIFEST,
                    f"its {key} {getattr(manifest, key)!r} differ from {sets[0]}'s "
                    f"{getattr(first, key)!r}",
                    "combine sets made for the same real dataset",
                )


def _rows(path: str, count: int, seed: int) -> pa.Table:
    table = read_split_table(path, "train")
    if table is None or len(table) < count:
        found = 0 if table is None else len(table)
        raise DataError(
            Location.of(path) / MANIFEST,
            f"count_each {count} asks for more rows than its {found}",
            f"ask for at most {found}, or 0 for the smallest set's count",
        )
    return only_ids(table, stable_order(table["id"].to_pylist(), seed)[:count])


def combine_synthetic(
    sets: list[str], out: str, cfg: CombineConfig, overwrite: bool = False
) -> Manifest:
    """``cfg.count_each`` rows of each labelled synthetic set in ``sets``, as one labelled set."""
    if len(sets) < 2:
        raise DataError(out, f"{len(sets)} set(s) to combine", "give two or more sets")
    check_output(out, overwrite, tuple(sets))
    manifests = [_labelled(path) for path in sets]
    _check_alike(sets, manifests)
    count = cfg.count_each or min(manifest.split_total("train") for manifest in manifests)
    tables = [_rows(path, count, cfg.seed) for path in sets]
    ids = [row_id for table in tables for row_id in table["id"].to_pylist()]
    if len(set(ids)) < len(ids):
        raise DataError(
            out, "two of the sets share row ids (the same set given twice?)", "give distinct sets"
        )
    with write_dataset(out, overwrite, inputs=tuple(sets)) as staging:
        staging.write_split("train", pa.concat_tables(tables))
        staging.publish(Manifest.combined(manifests, {**asdict(cfg), "count_each": count}))
    return staging.manifest

"""Two or more labelled synthetic sets as one: the arm that mixes GAN and copy-paste images
together.

A study trial mixes in one synthetic set; to ask whether GAN images add anything on top of
copy-paste ones, the two are combined first. Each set gives the same number of rows (by
default the smallest set's count, chosen in a seeded stable order), so a mix drawing from the
combination takes about as many of each. Every row keeps its id and the combination records
what each set's makers learnt from, so the leakage check sees all of them. The parts are taken
in the order of their dataset ids, so the same sets make the same combination in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from defectforge.core.config import SEED, TypedConfig, option
from defectforge.core.errors import DataError
from defectforge.core.storage import Location
from defectforge.datasets.contract import MANIFEST, only_ids, read_split_table
from defectforge.datasets.leakage import SOURCE_PIXELS, source_pixels, write_source_pixels
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.mix import stable_order
from defectforge.datasets.writer import check_derived_output, write_dataset

MAKERS = "`synth label`, `synth copy-paste`, or a --masks GAN's `gan generate`"


@dataclass(frozen=True)
class CombineConfig(TypedConfig):
    kind = "combine config"

    count_each: int = option(
        0, "rows taken from each set (0: the smallest set's count)", lambda v: v >= 0, ">= 0"
    )
    seed: int = option(0, "which rows a larger set gives", *SEED)


def _labelled(path: str) -> Manifest:
    """A set's manifest, after checking it is a labelled synthetic set with rows and a record of
    what its makers learnt from."""
    manifest, where = Manifest.load(path), Location.of(path) / MANIFEST
    if manifest.labelling is None:
        raise DataError(
            where, "it is not a labelled synthetic set", f"combine sets made by {MAKERS}"
        )
    if manifest.labelling.trained_on is None:
        raise DataError(
            where,
            "it does not record what its makers learnt from (an older defectforge made it), so "
            "a combination with it could not be checked for leakage",
            "make it again with this version",
        )
    if not manifest.split_total("train"):
        raise DataError(where, "it has no rows", f"combine sets made by {MAKERS} that kept images")
    return manifest


def _check_alike(parts: list[tuple[str, Manifest]]) -> None:
    (first_path, first), *rest = parts
    for path, manifest in rest:
        for key in ("channels", "classes", "binary"):
            if getattr(manifest, key) != getattr(first, key):
                raise DataError(
                    Location.of(path) / MANIFEST,
                    f"its {key} {getattr(manifest, key)!r} differ from {first_path}'s "
                    f"{getattr(first, key)!r}",
                    "combine sets made for the same real dataset",
                )


def _check_enough(parts: list[tuple[str, Manifest]], count: int) -> None:
    """Every set holds ``count`` rows: known from the manifests, before any rows are read."""
    # The smallest set first: the at-most its line gives then fits every set.
    for path, manifest in sorted(parts, key=lambda part: part[1].split_total("train")):
        rows = manifest.split_total("train")
        if rows < count:
            raise DataError(
                Location.of(path) / MANIFEST,
                f"count_each {count} asks for more rows than its {rows}",
                f"ask for at most {rows}, or 0 for the smallest set's count",
            )


def _rows(path: str, count: int, seed: int) -> pa.Table:
    table = read_split_table(path, "train")
    return only_ids(table, stable_order(table["id"].to_pylist(), seed)[:count])


def combine_synthetic(
    sets: list[str], out: str, cfg: CombineConfig, overwrite: bool = False
) -> Manifest:
    """``cfg.count_each`` rows of each labelled synthetic set in ``sets``, as one labelled set."""
    if len(sets) < 2:
        raise DataError(out, f"{len(sets)} set(s) to combine", "give two or more sets")
    check_derived_output(out, overwrite, tuple(sets))
    parts = sorted(((path, _labelled(path)) for path in sets), key=lambda p: p[1].dataset_id)
    _check_alike(parts)
    count = cfg.count_each or min(manifest.split_total("train") for _, manifest in parts)
    _check_enough(parts, count)
    tables = [_rows(path, count, cfg.seed) for path, _ in parts]
    ids = [row_id for table in tables for row_id in table["id"].to_pylist()]
    if len(set(ids)) < len(ids):
        raise DataError(
            out,
            "two of the sets share row ids (the same set given twice, or two sets made alike)",
            "give sets made apart (another seed or another source)",
        )
    settings = {"count_each": count, "seed": cfg.seed}
    with write_dataset(out, overwrite, inputs=tuple(sets)) as staging:
        staging.write_split("train", pa.concat_tables(tables))
        recorded = {k: v for path, _ in parts for k, v in source_pixels(path).items()}
        write_source_pixels(staging.path(SOURCE_PIXELS), recorded, set(ids))
        staging.publish(Manifest.combined([manifest for _, manifest in parts], settings))
    return staging.manifest

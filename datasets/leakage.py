"""No leakage: what made a synthetic set must not have seen the evaluation images it is judged on.

A labelled synthetic set records the datasets its makers learnt from (``trained_on``: the GAN's
data, the labeller's, or the real set copy-paste cut from). Mixing it into a real dataset is
refused when any of those makers trained on an image that is in the real dataset's val or test
split, found by sample id: a GAN trained on all of NEU-Seg's train images leaks into a few-shot
study whose test split is the images its 163 left out.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from defectforge.datasets.contract import MANIFEST, split_dir, split_files
from defectforge.datasets.errors import DataError
from defectforge.datasets.manifest import Manifest

HELD_OUT = ("val", "test")


def split_ids(root: str | Path, splits: tuple[str, ...]) -> set[str]:
    """The sample ids in ``splits`` of a dataset (splits it lacks hold none)."""
    found: set[str] = set()
    for split in splits:
        if split_dir(root, split).is_dir():
            found.update(pq.read_table(split_files(root, split), columns=["id"])["id"].to_pylist())
    return found


def _seen_ids(source: dict, where: Path) -> set[str]:
    """The train ids of the dataset a maker learnt from, if it is still there unchanged."""
    data, role = source["data"], source["role"]
    try:
        recorded = Manifest.load(data).dataset_id
    except DataError:
        recorded = None
    if recorded is None or (source["dataset_id"] and recorded != source["dataset_id"]):
        raise DataError(
            where,
            f"its {role} learnt from {data}, which is gone or has changed, so it cannot be "
            "checked against this dataset's val and test images",
            f"train the {role} on this dataset again, or restore {data}",
        )
    return split_ids(data, ("train",))


def check_no_leakage(real_root: str | Path, real: Manifest, synthetic_root: str | Path) -> None:
    """Refuse a synthetic set whose GAN, labeller or copy-paste source saw a val or test image
    of ``real``."""
    where = Path(synthetic_root) / MANIFEST
    labelling = Manifest.load(synthetic_root).section("labelling") or {}
    sources = labelling.get("trained_on")
    if sources is None:
        raise DataError(
            where,
            "it does not record what its GAN and labeller learnt from (an older defectforge "
            "made it), so it cannot be checked for leakage",
            "label the images again with this version",
        )
    held_out = None
    for source in sources:
        if source["dataset_id"] == real.dataset_id:
            continue  # trained on this very dataset: it reads only the train split
        held_out = held_out if held_out is not None else split_ids(real_root, HELD_OUT)
        leaked = sorted(_seen_ids(source, where) & held_out)
        if leaked:
            raise DataError(
                where,
                f"its {source['role']} learnt from {len(leaked)} image(s) that are in "
                f"{real_root}'s val or test split (e.g. {leaked[0]}): they would be judged on "
                "images their synthetic data was made from",
                f"train the {source['role']} on {real_root}'s train split only",
            )

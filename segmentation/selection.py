"""Which epoch, trial and model is best: one rule, free of torch so that the study's driver,
its reports and the data tasks that read run folders do not load it."""

from __future__ import annotations

# The headline, and what picks the best epoch, trial and model everywhere.
SELECTION_METRIC = "val_binary_defect_iou"


def best_epoch(rows: list[dict]) -> dict | None:
    """The first row (epoch) with the best validation score; rows without a score are skipped.
    The one rule for a trial's best epoch: its table row and its kept checkpoint agree."""
    scored = [row for row in rows if row.get(SELECTION_METRIC) is not None]
    return max(scored, key=lambda row: row[SELECTION_METRIC]) if scored else None

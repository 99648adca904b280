"""Which epoch, trial and model is best: one rule, free of torch so that the study's driver,
its reports and the data tasks that read run folders do not load it."""

from __future__ import annotations

# The headline, and what picks the best epoch, trial and model everywhere.
SELECTION_METRIC = "val_binary_defect_iou"
# What a study's scheduler and searcher rank trial epochs by: SELECTION_METRIC, ties broken by
# the soft defect IoU of the probabilities. Early epochs at CPU size often score a hard IoU of 0
# in several trials at once, and ASHA stops none of a tie. One pixel moves the hard IoU by
# 1 / union; at 1e-9 the tie-break stays below that for any split under 1e9 defect pixels.
RANKING_METRIC = "val_ranking_score"
_TIE_BREAK_WEIGHT = 1e-9


def ranking_score(metrics: dict) -> float:
    """An epoch's SELECTION_METRIC plus 1e-9 of its soft defect IoU (0 for either one
    missing)."""
    hard = metrics.get(SELECTION_METRIC) or 0.0
    return hard + _TIE_BREAK_WEIGHT * (metrics.get("val_soft_defect_iou") or 0.0)


def best_epoch(rows: list[dict]) -> dict | None:
    """The first row (epoch) with the best validation score; rows without a score are skipped.
    The one rule for a trial's best epoch: its table row and its kept checkpoint agree."""
    scored = [row for row in rows if row.get(SELECTION_METRIC) is not None]
    return max(scored, key=lambda row: row[SELECTION_METRIC]) if scored else None

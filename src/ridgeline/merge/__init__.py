"""Merging: averaging (aligned, MergeMany), Fisher-weighted averaging, task arithmetic,
TIES, DARE, and the merge planner that predicts a merge's loss before evaluating it.

See docs/merging.md for the formulas and the derivation of the planner's prediction.
"""

from ridgeline.merge.alignment import ManyAlignment, align_many
from ridgeline.merge.core import METHODS, MergeResult, merge
from ridgeline.merge.fisher import fisher_diagonal
from ridgeline.merge.planner import MergeCandidate, MergePlan, predict_merge, predicted_merge_loss

__all__ = ["merge", "MergeResult", "METHODS", "fisher_diagonal", "align_many", "ManyAlignment",
           "predict_merge", "predicted_merge_loss", "MergePlan", "MergeCandidate"]

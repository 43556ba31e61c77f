"""Connectivity: linear paths and barriers, permutation alignment (Git Re-Basin),
layer-wise barriers, barrier prediction and loss-landscape slices.

See docs/connectivity.md for the formulas, conventions and the permutation-spec format.
"""

from ridgeline.connectivity.alignment import AlignmentResult, align, permute_model
from ridgeline.connectivity.layerwise import LayerwiseResult, layer_groups, layerwise_barriers
from ridgeline.connectivity.paths import PathResult, barrier, interpolate, reset_bn
from ridgeline.connectivity.permutation_spec import (
                                                     PermutationSpec,
                                                     apply_permutations,
                                                     coerce_spec,
                                                     permutation_spec,
)
from ridgeline.connectivity.prediction import BarrierPrediction, LayerPrediction, predict_barrier
from ridgeline.connectivity.slices import SliceResult, landscape_slice, slice  # noqa: A004

__all__ = ["interpolate", "PathResult", "barrier", "reset_bn", "align", "AlignmentResult",
           "permute_model", "permutation_spec", "PermutationSpec", "coerce_spec",
           "apply_permutations", "layerwise_barriers", "LayerwiseResult", "layer_groups",
           "predict_barrier", "BarrierPrediction", "LayerPrediction", "slice", "landscape_slice",
           "SliceResult"]

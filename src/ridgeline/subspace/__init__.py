"""Subspace training and the intrinsic dimension of objective landscapes.

``SubspaceModel`` trains a network within a random affine subspace θ = θ₀ + P z of its
parameter space; ``intrinsic_dimension`` finds the smallest subspace dimension d that
reaches 90 % of the full model's accuracy (Li, Farkhoor, Liu & Yosinski 2018).
"""

from ridgeline.subspace.intrinsic import DEFAULT_DIMS, IntrinsicDimension, intrinsic_dimension
from ridgeline.subspace.model import SubspaceModel
from ridgeline.subspace.projections import (
                                            PROJECTIONS,
                                            DenseProjection,
                                            FastfoodProjection,
                                            Projection,
                                            SparseProjection,
                                            fwht,
                                            make_projection,
                                            projection_bytes,
)

__all__ = ["SubspaceModel", "intrinsic_dimension", "IntrinsicDimension", "DEFAULT_DIMS",
           "Projection", "DenseProjection", "SparseProjection", "FastfoodProjection",
           "make_projection", "projection_bytes", "fwht", "PROJECTIONS"]

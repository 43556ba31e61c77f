"""Curvature of the loss: Hessian/GGN/Fisher operators, extreme eigenvalues, trace, spectral
density, adaptive sharpness, gradient-in-top-subspace, and the edge-of-stability callback.

>>> H = ridgeline.curvature.hessian(model, data)           # doctest: +SKIP
>>> spectrum = ridgeline.curvature.top_eigenvalues(H, k=5)  # doctest: +SKIP
"""

from ridgeline.curvature.operators import CurvatureOperator, fisher, ggn, hessian
from ridgeline.curvature.overlap import GradientOverlap, gradient_overlap
from ridgeline.curvature.sharpness import SharpnessResult, sharpness
from ridgeline.curvature.spectrum import Spectrum, density, top_eigenvalues, trace
from ridgeline.curvature.stability import EdgeOfStability, stability_threshold
from ridgeline.linalg import SpectralDensity, TraceEstimate

__all__ = ["CurvatureOperator", "hessian", "ggn", "fisher", "Spectrum", "top_eigenvalues",
           "trace", "TraceEstimate", "density", "SpectralDensity", "sharpness",
           "SharpnessResult", "gradient_overlap", "GradientOverlap", "EdgeOfStability",
           "stability_threshold"]

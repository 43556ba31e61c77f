"""Neural tangent kernels (docs/methods.md §4).

* :func:`empirical_ntk` — Θ(x, x') = J(x) J(x')ᵀ of any model, tiled under a memory budget
  (:func:`plan_ntk` shows the plan: method, tile size, memory estimate).
* :func:`infinite_ntk`, :func:`infinite_nngp` — closed-form infinite-width kernels of
  NTK-parameterised MLPs (ReLU, erf).
* :func:`predict_gd` — outputs under gradient flow on MSE from the NTK.
* :func:`spectrum`, :func:`alignment`, :func:`drift`, :func:`relative_error` — diagnostics.
"""

from ridgeline.kernels.alignment import KernelSpectrum, alignment, drift, relative_error, spectrum
from ridgeline.kernels.dynamics import predict_gd
from ridgeline.kernels.infinite import infinite_nngp, infinite_ntk
from ridgeline.kernels.ntk import NTKPlan, empirical_ntk, plan_ntk

__all__ = ["empirical_ntk", "plan_ntk", "NTKPlan", "infinite_ntk", "infinite_nngp",
           "predict_gd", "spectrum", "KernelSpectrum", "alignment", "drift", "relative_error"]

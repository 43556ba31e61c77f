"""Transport instrument: sliced Wasserstein distances between point clouds.

Monte Carlo sliced Wasserstein with Gaussian control variates (Nguyen & Ho 2024), max-SW
with an optimised direction, distributional SW with von Mises–Fisher directions, and
distances between two networks' representations. Needs only tensors.
"""

from ridgeline.transport.control_variates import control_variate
from ridgeline.transport.convergence import SWConvergence, sliced_wasserstein_convergence
from ridgeline.transport.distributional import distributional_sliced_wasserstein
from ridgeline.transport.features import FeatureDistance, feature_distance
from ridgeline.transport.max_sliced import max_sliced_wasserstein
from ridgeline.transport.projections import project, random_directions
from ridgeline.transport.sliced import sliced_wasserstein
from ridgeline.transport.vmf import vmf_directions
from ridgeline.transport.wasserstein1d import wasserstein_1d

__all__ = [
    "sliced_wasserstein",
    "max_sliced_wasserstein",
    "distributional_sliced_wasserstein",
    "feature_distance",
    "FeatureDistance",
    "sliced_wasserstein_convergence",
    "SWConvergence",
    "project",
    "random_directions",
    "vmf_directions",
    "wasserstein_1d",
    "control_variate",
]

"""Forward gradients: gradient estimates from forward-mode directional derivatives.

``forward_gradient`` estimates ∇L from Jacobian-vector products along guess directions
(random, local-loss, previous, user-given); ``quality`` measures the cosine of the
estimate with the backprop gradient; ``ForwardGradientSGD`` and
``ridgeline.train(..., gradient="forward")`` train with the estimates. See
docs/forward-gradients.md and docs/methods.md §5.
"""

from ridgeline.gradients import training as _training  # noqa: F401 - registers "forward"
from ridgeline.gradients.forward import (
                                         ForwardGradient,
                                         combine_estimate,
                                         directional_derivatives,
                                         forward_gradient,
)
from ridgeline.gradients.guesses import (
                                         CallableGuess,
                                         Guess,
                                         GuessBatch,
                                         PreviousGuess,
                                         RandomGuess,
                                         TensorGuess,
)
from ridgeline.gradients.local import LocalGuess
from ridgeline.gradients.quality import GuessQuality, expected_random_cosine, quality
from ridgeline.gradients.training import ForwardGradientSGD

__all__ = ["forward_gradient", "ForwardGradient", "directional_derivatives", "combine_estimate",
           "Guess", "GuessBatch", "RandomGuess", "PreviousGuess", "TensorGuess", "CallableGuess",
           "LocalGuess", "quality", "GuessQuality", "expected_random_cosine",
           "ForwardGradientSGD"]

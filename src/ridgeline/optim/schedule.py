"""When SAF's and MESA's KL term is on: the authors' ``epoch > kl_start_epoch`` rule."""

from __future__ import annotations

__all__ = ["KLStart"]


class KLStart:
    """The start rule of the KL term shared by SAF and MESA.

    The authors' code (``SAF_train.py`` and ``MESA_train.py``, github.com/AngusDujw/SAF)
    counts epochs from 0 and adds the term when ``epoch > args.kl_start_epoch``. A caller
    that numbers its first epoch ``first_epoch`` (1 for :func:`ridgeline.train`, 0 for a
    ``range(epochs)`` loop) gets the same epoch of training: the term is on when
    ``epoch − first_epoch > start_epoch``, first in epoch ``first_epoch + start_epoch + 1``.

    Parameters
    ----------
    start_epoch : int
        The authors' ``kl_start_epoch`` (their default 5).
    first_epoch : int
        The number the caller gives its first epoch.
    """

    def __init__(self, start_epoch: int, first_epoch: int = 1) -> None:
        self.start_epoch, self.first_epoch = int(start_epoch), int(first_epoch)

    @property
    def first_active_epoch(self) -> int:
        """``first_epoch + start_epoch + 1``: 7 for 1-based epochs and start_epoch = 5."""
        return self.first_epoch + self.start_epoch + 1

    def active(self, epoch: int) -> bool:
        """Whether the term is on in ``epoch`` (the caller's numbering)."""
        return int(epoch) - self.first_epoch > self.start_epoch

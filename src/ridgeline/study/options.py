"""Options shared by several measurement kinds.

:class:`WeightMatchingOptions` adds ``restarts`` to the kinds that align models by weight
matching (``connectivity``, ``barrier_prediction``, ``merge``): how many runs of the
coordinate descent :func:`ridgeline.connectivity.alignment.weight_matching` makes by
iterated local search, keeping the highest objective Σ⟨θ_A, π(θ_B)⟩.
"""

from __future__ import annotations

from typing import Any

from pydantic import field_validator

from ridgeline.study.registry import Options

__all__ = ["WeightMatchingOptions", "restarts_problem", "used_restarts"]


class WeightMatchingOptions(Options):
    """``restarts``: runs of weight matching (an integer ≥ 1); omitted, the library's default
    (1 for models without attention heads, more for transformers)."""

    restarts: int | None = None

    @field_validator("restarts", mode="before")
    @classmethod
    def _positive_integer(cls, value: Any) -> Any:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"restarts must be an integer ≥ 1 (runs of weight matching; 1 is "
                             f"a single descent), got {value!r}; leave it out for the default")
        return value

    def resume_key(self) -> dict[str, Any]:
        """Without ``restarts`` the record depends on the library's default for transformers
        (it has changed between versions): a record made under another default is redone."""
        if self.restarts is not None:
            return {}
        from ridgeline.connectivity.heads import STRUCTURED_RESTARTS

        return {"restarts with attention heads": STRUCTURED_RESTARTS}


def restarts_problem(restarts: int | None, weights: bool) -> list[str]:
    """A problem when ``restarts`` is set but no alignment of the measurement uses weight
    matching (the setting would do nothing)."""
    if restarts is None or weights:
        return []
    return [f"restarts = {restarts} applies to weight matching only; add 'weights' to align "
            "or leave restarts out"]


def used_restarts(restarts: int | None, spec: Any) -> int:
    """The runs weight matching made on ``spec``: ``restarts``, or the library's default."""
    if restarts is not None:
        return int(restarts)
    from ridgeline.connectivity.heads import default_restarts

    return default_restarts(spec)

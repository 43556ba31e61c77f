"""Model factories by name, so a checkpoint's sidecar can rebuild its architecture."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from ridgeline.errors import ConfigError

FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def model_factory(name: str):
    """Register a model factory; the module it builds remembers its name and arguments
    in ``module.ridgeline_architecture`` (JSON-safe)."""

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        @functools.wraps(factory)
        def build(*args: Any, **kwargs: Any) -> nn.Module:
            import inspect

            bound = inspect.signature(factory).bind(*args, **kwargs)
            bound.apply_defaults()
            module = factory(*bound.args, **bound.kwargs)
            arguments = {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in bound.arguments.items()}
            module.ridgeline_architecture = {"factory": name, "kwargs": arguments}
            return module

        FACTORIES[name] = build
        return build

    return decorate


def build_model(factory: str, **kwargs: Any) -> nn.Module:
    """Build a registered model (``"mlp"``, ``"cnn1d"``, ``"resnet"``, ``"transformer"``)
    from its arguments."""
    if factory not in FACTORIES:
        raise ConfigError(f"unknown model {factory!r}; known models are {sorted(FACTORIES)}.")
    try:
        return FACTORIES[factory](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for model {factory!r}: {exc}") from exc

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
    """Build a model from its factory and keyword arguments.

    ``factory`` is a registered name (``"mlp"``, ``"cnn1d"``, ``"resnet"``,
    ``"transformer"``, ...) or user code written ``"package.module:callable"``, which is
    imported and called with ``kwargs`` and must return an ``nn.Module``. Either way the
    module records ``ridgeline_architecture = {"factory": ..., "kwargs": ...}`` so a
    checkpoint saved from it can rebuild it (user factories: when the arguments are
    JSON-safe).
    """
    from ridgeline.usercode import (
        call_user,
        describe_signature,
        is_import_path,
        json_safe_arguments,
        resolve_callable,
    )

    if is_import_path(factory):
        fn = resolve_callable(factory, "model factory")
        module = call_user(fn, factory, "model factory", **kwargs)
        if not isinstance(module, nn.Module):
            raise ConfigError(f"model factory {factory!r} returned a {type(module).__name__}; it "
                              "must return a torch.nn.Module.")
        arguments = json_safe_arguments(kwargs)
        module.ridgeline_architecture = (None if arguments is None else
                                         {"factory": factory, "kwargs": arguments})
        return module
    if factory not in FACTORIES:
        raise ConfigError(f"unknown model {factory!r}; known models are {sorted(FACTORIES)}, or "
                          "name your own factory as 'package.module:callable'.")
    try:
        return FACTORIES[factory](**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad arguments for model {factory!r} ({kwargs}): {exc}. Its signature "
                          f"is {describe_signature(FACTORIES[factory])}.") from exc


def check_model(factory: str, **kwargs: Any) -> None:
    """Check a model's factory and arguments without building it: the factory is registered
    (or its ``"package.module:callable"`` imports) and the arguments fit its signature.
    Raises :class:`ConfigError`; for validating a study before any work."""
    from ridgeline.usercode import check_arguments, is_import_path, resolve_callable

    if is_import_path(factory):
        check_arguments(resolve_callable(factory, "model factory"), factory, "model factory",
                        **kwargs)
        return
    if factory not in FACTORIES:
        raise ConfigError(f"unknown model {factory!r}; known models are {sorted(FACTORIES)}, or "
                          "name your own factory as 'package.module:callable'.")
    check_arguments(FACTORIES[factory], factory, "model", **kwargs)

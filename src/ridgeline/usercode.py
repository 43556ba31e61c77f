"""User code named as ``"package.module:callable"``: model factories and data loaders.

One resolver for every place that accepts user code (study configs, ``--model``,
``--data``, checkpoint sidecars). Errors name the module and attribute that failed, and an
argument mismatch shows the callable's signature.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

from ridgeline.errors import ConfigError

__all__ = ["is_import_path", "resolve_callable", "call_user", "check_arguments",
           "describe_signature", "check_rebuildable", "json_safe_arguments"]


def is_import_path(spec: Any) -> bool:
    """Whether ``spec`` names user code (``"package.module:callable"``), not a built-in name."""
    return isinstance(spec, str) and ":" in spec


def _split(spec: str, what: str) -> tuple[str, str]:
    module, sep, attribute = spec.partition(":")
    if not sep or not module.strip() or not attribute.strip() or ":" in attribute:
        raise ConfigError(f"{what} {spec!r} must be written 'package.module:callable' (one colon "
                          "between the module and the function or class), e.g. 'mypkg.nets:make'.")
    return module.strip(), attribute.strip()


def resolve_callable(spec: str, what: str = "callable") -> Callable[..., Any]:
    """Import ``"package.module:callable"`` and return the callable.

    ``callable`` may be dotted (``"mypkg.nets:Zoo.make"``). Raises :class:`ConfigError`
    naming the module or attribute that could not be found.
    """
    module_name, attribute = _split(spec, what)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise ConfigError(
                f"{what} {spec!r}: cannot import module {module_name!r} (no module named "
                f"{missing!r}). Put the folder that contains {missing.split('.')[0]!r} on "
                "PYTHONPATH (e.g. PYTHONPATH=path/to/code ridgeline ...) or pip install it."
            ) from exc
        raise ConfigError(f"{what} {spec!r}: importing module {module_name!r} failed because it "
                          f"imports {missing!r}, which is not installed.") from exc
    except Exception as exc:  # the user's module raised while importing
        raise ConfigError(f"{what} {spec!r}: importing module {module_name!r} raised "
                          f"{type(exc).__name__}: {exc}") from exc
    target: Any = module
    for i, part in enumerate(attribute.split(".")):
        if not hasattr(target, part):
            where = module_name if i == 0 else f"{module_name}:{'.'.join(attribute.split('.')[:i])}"
            names = sorted(n for n in dir(target) if not n.startswith("_")
                           and callable(getattr(target, n, None)))
            hint = f"; it defines {names[:12]}" if names else ""
            raise ConfigError(f"{what} {spec!r}: {where!r} has no attribute {part!r}{hint}.")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{what} {spec!r}: {module_name}.{attribute} is a "
                          f"{type(target).__name__}, not a function or class.")
    return target


def describe_signature(fn: Callable[..., Any]) -> str:
    """``name(arg, *, key=default)`` for messages; just the name when there is none."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    try:
        return f"{name}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return name


def call_user(fn: Callable[..., Any], spec: str, what: str, *args: Any,
              **kwargs: Any) -> Any:
    """Call user code after checking that the arguments bind to its signature.

    A mismatch raises :class:`ConfigError` with the arguments given and the signature.
    Exceptions raised inside the user's code propagate unchanged (with their traceback).
    """
    check_arguments(fn, spec, what, *args, **kwargs)
    return fn(*args, **kwargs)


def check_arguments(fn: Callable[..., Any], spec: str, what: str, *args: Any,
                    **kwargs: Any) -> None:
    """Raise :class:`ConfigError` (with the signature) when the arguments do not bind to
    ``fn``; nothing is called. For validating a configuration before any work."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        given = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
        raise ConfigError(f"{what} {spec!r} cannot be called with ({given}): {exc}. Its "
                          f"signature is {describe_signature(fn)}.") from exc


def check_rebuildable(spec: str, source: str) -> None:
    """Refuse to call code named by a file (a checkpoint sidecar) when it is not a model
    factory: the standard library, builtins and anything that is not a Python function or
    class. A sidecar is data; it must not be able to run ``os:system``."""
    module_name, _ = _split(spec, "model factory")
    top = module_name.split(".")[0]
    stdlib = getattr(sys, "stdlib_module_names", frozenset({"os", "sys", "subprocess", "shutil"}))
    internal = top == "ridgeline" and not module_name.startswith("ridgeline.models")
    if top in stdlib or top in ("builtins", "torch") or internal:
        raise ConfigError(f"{source} names {spec!r} as its model factory; ridgeline only rebuilds "
                          "models from your own packages, not from the standard library, torch "
                          "or ridgeline internals. Pass the model (or --model) yourself.")
    fn = resolve_callable(spec, f"model factory recorded in {source}")
    if not (inspect.isfunction(fn) or inspect.isclass(fn)):
        raise ConfigError(f"{source} names {spec!r}, which is a {type(fn).__name__}, not a Python "
                          "function or class; pass the model (or --model) yourself.")


def json_safe_arguments(arguments: Mapping[str, Any]) -> dict[str, Any] | None:
    """The arguments as JSON-safe values (tuples become lists), or ``None`` when one of them
    cannot be written to JSON (then a checkpoint cannot record how to rebuild the model)."""
    import json

    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in arguments.items()}
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return out

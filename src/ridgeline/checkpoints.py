"""Reading and writing model checkpoints, safely.

One place that knows every checkpoint format ridgeline reads:

- ``.safetensors`` files, with a ridgeline JSON sidecar (``<path>.json``, written by
  :func:`save`, which records how to rebuild the model) or without one;
- PyTorch ``state_dict`` files (``.pt``, ``.pth``, ``.bin``), always read with
  ``torch.load(weights_only=True)``: nothing is unpickled, so a file that holds Python
  objects besides tensors is refused with :class:`CheckpointError` and never executed;
- Hugging Face model folders (``config.json`` + weights), read through ``transformers``
  with ``local_files_only=True`` (the optional ``hf`` extra).

The model a file's tensors belong to comes from, in order: the ``model`` you pass, a
``factory`` (a registered name or ``"package.module:callable"``) with ``model_args``, the
sidecar, or the Hugging Face ``config.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ridgeline._files import atomic_write_bytes
from ridgeline._version import __version__
from ridgeline.errors import (
    ArchitectureMismatchError,
    CheckpointError,
    ConfigError,
    RidgelineError,
)

__all__ = ["save", "load", "checkpoint_info", "read_state_dict", "load_state", "CHECKPOINT_FORMAT",
           "STATE_DICT_SUFFIXES", "is_huggingface_folder"]

CHECKPOINT_FORMAT = "ridgeline-checkpoint/1"
#: suffixes read as PyTorch state_dict files (torch.load with weights_only=True)
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HF_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


# ----------------------------------------------------------------------------- writing
def _sidecar(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".json") if path.suffix != ".json" else path


def save(model: nn.Module, path: str | os.PathLike, *,
         metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the model's state (parameters and buffers) as safetensors, plus a JSON sidecar
    ``<path>.json`` with the architecture (factory and arguments) and the ridgeline version.

    Models built by :func:`ridgeline.models.build_model` (registered names and user
    factories ``"package.module:callable"``) record their factory, so :func:`load` rebuilds
    them without being given the model. Both files are written atomically. Under
    torch.distributed only rank 0 writes, and every rank returns once the files exist.
    Returns the checkpoint path.
    """
    from safetensors.torch import save as st_save

    from ridgeline import distributed

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; save to a file such as "
                              f"{path / 'model.safetensors'}.")
    if path.suffix.lower() in STATE_DICT_SUFFIXES:
        raise CheckpointError(f"ridgeline.save writes safetensors, not a pickled {path.suffix} "
                              f"file; name it {path.with_suffix('.safetensors').name}.")
    if not distributed.is_main_process():
        distributed.barrier()
        return path
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    info = {"format": CHECKPOINT_FORMAT, "ridgeline_version": __version__,
            "architecture": getattr(model, "ridgeline_architecture", None),
            "model_class": type(model).__name__,
            "tensors": {k: list(v.shape) for k, v in state.items()},
            "metadata": dict(metadata or {})}
    atomic_write_bytes(path, st_save(_unshare(state), metadata={"format": CHECKPOINT_FORMAT}))
    atomic_write_bytes(_sidecar(path), json.dumps(info, indent=2, default=str).encode())
    distributed.barrier()
    return path


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of tensors that share storage (tied weights): safetensors refuses shared ones."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen and tensor.numel() else tensor
        seen.add(key)
    return out


# ----------------------------------------------------------------------------- reading
def checkpoint_info(path: str | os.PathLike) -> dict:
    """The JSON sidecar of a ridgeline checkpoint."""
    path = Path(path)
    sidecar = _sidecar(path)
    if not sidecar.exists():
        raise CheckpointError(f"{sidecar} is missing: {path} was not written by ridgeline.save "
                              "(or its sidecar was lost). Pass the model to load(path, model).")
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read the checkpoint sidecar {sidecar}: {exc}") from exc
    if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise CheckpointError(f"{sidecar} is not a ridgeline checkpoint sidecar "
                              f"(format {found!r}, expected {CHECKPOINT_FORMAT!r}).")
    return info


def is_huggingface_folder(path: str | os.PathLike) -> bool:
    """A folder with a ``config.json``: a Hugging Face model saved by ``save_pretrained``."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, by name, on the CPU; nothing is unpickled.

    ``.safetensors`` through safetensors; ``.pt``/``.pth``/``.bin`` through
    ``torch.load(weights_only=True)`` and must hold a plain ``{name: tensor}`` state_dict;
    a Hugging Face folder: its weight file(s).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (studies keep "
                              "theirs in runs/<name>/checkpoints/).")
    if path.is_dir():
        return _read_folder_weights(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors" or (suffix not in STATE_DICT_SUFFIXES
                                    and _sidecar(path).is_file()):
        return _read_safetensors(path)  # ridgeline.save writes safetensors whatever the name
    if suffix in STATE_DICT_SUFFIXES:
        return _read_torch(path)
    raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; ridgeline reads "
                          ".safetensors, PyTorch state_dict files (.pt, .pth, .bin) and Hugging "
                          "Face model folders. Rename a plain state_dict file to .pt.")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {exc}") from exc


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line),
                      first[0] if first else "")
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects besides tensors ({detail.strip()}), "
            "and ridgeline never unpickles them (torch.load(weights_only=True)), because "
            "unpickling can run arbitrary code. Re-save only the tensors where the file was made: "
            "torch.save(model.state_dict(), path), or save it as .safetensors.") from exc
    except Exception as exc:  # corrupt zip, truncated file, not a torch file at all
        raise CheckpointError(f"{path} is not a readable PyTorch state_dict file: "
                              f"{type(exc).__name__}: {exc}") from exc
    return _check_plain_state_dict(state, path)


def _check_plain_state_dict(state: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state_dict; save the "
                              "model's tensors with torch.save(model.state_dict(), path).")
    others = {k: type(v).__name__ for k, v in state.items()
              if not isinstance(k, str) or not isinstance(v, torch.Tensor)}
    if others:
        nested = [k for k, v in state.items() if isinstance(v, Mapping)
                  and v and all(isinstance(t, torch.Tensor) for t in v.values())]
        hint = (f" The tensors seem to be under {nested[0]!r}: save that entry alone, "
                f"torch.save(checkpoint[{nested[0]!r}], path).") if nested else (
            " Save only the model's tensors: torch.save(model.state_dict(), path).")
        shown = ", ".join(f"{k!r} ({t})" for k, t in list(others.items())[:6])
        raise CheckpointError(f"{path} is not a plain state_dict of tensors: it also holds {shown}."
                              + hint)
    return dict(state)


def _read_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in _HF_WEIGHTS:
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    for name in _HF_INDEX:
        index = folder / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"cannot read the shard index {index}: {exc}") from exc
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_state_dict(folder / shard))
            return state
    raise CheckpointError(f"{folder} is a folder without model weights ({', '.join(_HF_WEIGHTS)}); "
                          "pass a checkpoint file or a Hugging Face model folder.")


# ----------------------------------------------------------------------------- models
def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike
               ) -> nn.Module:
    """Copy ``state`` into ``model`` after checking that every tensor fits (names and shapes);
    raises :class:`ArchitectureMismatchError` listing the tensors that do not."""
    expected = model.state_dict(keep_vars=True)
    tied = _tied_names(expected, state)
    problems = [f"'{k}' missing from the checkpoint" for k in expected
                if k not in state and k not in tied]
    problems += [f"'{k}' is in the checkpoint but not in the model"
                 for k in state if k not in expected]
    problems += [f"'{k}' has shape {tuple(state[k].shape)} in the checkpoint but "
                 f"{tuple(expected[k].shape)} in the model" for k in expected
                 if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if problems:
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ArchitectureMismatchError(f"checkpoint {source} does not fit the model: "
                                        f"{'; '.join(problems[:10])}{more}. Build the model with "
                                        "the arguments it was saved with.")
    model.load_state_dict(state, strict=not tied)
    model.eval()
    return model


def _tied_names(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
                ) -> set[str]:
    """Model tensors missing from ``state`` that share memory with one it holds (tied
    weights, e.g. a language model's output layer and its embedding): loading the other
    fills them."""
    present = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
               for k, t in expected.items() if k in state and t.numel()}
    return {k for k, t in expected.items() if k not in state and t.numel()
            and (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) in present}


def _build(factory: str, model_args: Mapping[str, Any] | None, source: str) -> nn.Module:
    from ridgeline.models import build_model

    if model_args is not None and not isinstance(model_args, Mapping):
        raise ConfigError(f"model_args must be a mapping of keyword arguments, got "
                          f"{type(model_args).__name__}.")
    return build_model(factory, **dict(model_args or {}))


def _from_sidecar(path: Path) -> nn.Module:
    from ridgeline.usercode import check_rebuildable, is_import_path

    info = checkpoint_info(path)
    arch = info.get("architecture")
    if not arch:
        raise CheckpointError(f"{path} does not record its architecture (the model was not "
                              "built by ridgeline.models.build_model); pass the model: "
                              "load(path, model), load(path, factory=..., model_args=...), or "
                              "--model MODULE:CALLABLE --model-args JSON on the command line.")
    sidecar = _sidecar(path)
    if not isinstance(arch, dict) or not isinstance(arch.get("factory"), str) or not isinstance(
            arch.get("kwargs", {}), dict):
        raise CheckpointError(f"{sidecar}: 'architecture' must be {{\"factory\": name, \"kwargs\": "
                              f"{{...}}}}, got {arch!r}.")
    try:
        if is_import_path(arch["factory"]):
            check_rebuildable(arch["factory"], str(sidecar))
        return _build(arch["factory"], arch.get("kwargs", {}), str(path))
    except RidgelineError as exc:
        raise CheckpointError(f"cannot rebuild the model recorded in {sidecar}: {exc} Fix the "
                              "sidecar, or pass the model (--model MODULE:CALLABLE --model-args "
                              "JSON on the command line).") from exc


def _huggingface(folder: Path) -> nn.Module:
    try:
        import transformers
    except ImportError as exc:
        raise CheckpointError(
            f"{folder} is a Hugging Face model folder; reading it needs the optional "
            "transformers package: pip install 'ridgeline[hf]'.") from exc
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder}/config.json is not a readable Hugging Face config: "
                              f"{exc}") from exc
    names = list(getattr(config, "architectures", None) or [])
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    cls = cls or transformers.AutoModel
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True,
                                          output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the Hugging Face model in {folder}: {exc}") from exc
    missing = list(info.get("missing_keys") or [])
    mismatched = [f"'{k}' has shape {tuple(a)} in the checkpoint but {tuple(b)} in the model"
                  for k, a, b in (info.get("mismatched_keys") or [])]
    if missing or mismatched:
        problems = [f"'{k}' missing from the checkpoint" for k in missing] + mismatched
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more"
                                             if len(problems) > 10 else "")
        raise ArchitectureMismatchError(
            f"checkpoint {folder} does not fit {cls.__name__}: {shown}. (transformers would "
            "initialise these tensors at random; ridgeline refuses to measure such a model.)")
    model.eval()
    return model


def load(path: str | os.PathLike, model: nn.Module | None = None, *,
         factory: str | None = None, model_args: Mapping[str, Any] | None = None) -> nn.Module:
    """Load a checkpoint into a model and return the model in eval mode.

    Parameters
    ----------
    path : path
        A ``.safetensors`` file (with or without a ridgeline sidecar), a PyTorch
        ``state_dict`` file (``.pt``, ``.pth``, ``.bin``; read with
        ``torch.load(weights_only=True)``, never unpickled), or a Hugging Face model folder.
    model : nn.Module, optional
        The model to load the tensors into.
    factory : str, optional
        Instead of ``model``: a registered model name (``"mlp"``) or user code
        ``"package.module:callable"``, called with ``model_args`` as keywords.
    model_args : mapping, optional
        Keyword arguments of ``factory``.

    Without ``model`` or ``factory`` the model is rebuilt from the ridgeline sidecar
    (which records the factory, user factories included) or, for a Hugging Face folder,
    from its ``config.json`` through ``transformers``.

    Raises
    ------
    CheckpointError
        Missing or unreadable file, a PyTorch file that is not a plain state_dict (refused,
        not unpickled), no way to know the model, ``transformers`` missing.
    ArchitectureMismatchError
        The tensors do not fit the model; the message lists them.
    """
    path = Path(path)
    if model is not None and factory is not None:
        raise ConfigError("pass either a model or a factory to load(), not both.")
    if model_args and factory is None:
        raise ConfigError("model_args needs a factory (load(path, factory='mypkg.nets:make', "
                          "model_args={...})).")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (studies keep "
                              "theirs in runs/<name>/checkpoints/).")
    if path.is_dir() and model is None and factory is None:
        if not is_huggingface_folder(path):
            raise CheckpointError(f"{path} is a folder without config.json; pass a checkpoint file "
                                  "(.safetensors, .pt, .pth, .bin) or a Hugging Face model folder.")
        return _huggingface(path)
    state = read_state_dict(path)  # read (and refuse bad files) before building anything
    if model is None:
        if factory is not None:
            model = _build(factory, model_args, str(path))
        elif _sidecar(path).exists():
            model = _from_sidecar(path)
        else:
            raise CheckpointError(
                f"{path} holds only weights (no ridgeline sidecar {_sidecar(path).name}), so "
                "ridgeline does not know which model they belong to. Pass it: load(path, model), "
                "load(path, factory='mypkg.nets:make', model_args={...}), or on the command line "
                "--model mypkg.nets:make --model-args '{...}'.")
    return load_state(model, state, path)

"""Options and checks shared by every ``ridgeline`` command.

Every command that reads a checkpoint takes the same ``--model``, ``--model-args`` and
``--data`` (``--data-args``) options and loads through :func:`load_model` and
:func:`load_data`; arguments are checked here *before* any expensive work, and a bad one
becomes a :class:`ridgeline.errors.RidgelineError` that :func:`fail` prints as one line.

Use in a command::

    def command(checkpoint: Path = typer.Argument(...),
                model: str | None = model_option(),
                model_args: str | None = model_args_option(),
                data: str = data_option(),
                data_args: str | None = data_args_option(), ...):
        try:
            net = load_model(checkpoint, model, model_args)
            dataset = load_data(data, "train", subset, data_args)
        except RidgelineError as exc:
            fail(exc)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NoReturn

import typer

from ridgeline.errors import ConfigError, DataError

__all__ = ["fail", "progress_on", "model_option", "model_args_option", "data_option",
           "data_args_option", "parse_json_object", "parse_ints", "parse_floats",
           "parse_key_values", "load_model", "load_data", "check_plot_path", "check_output_file",
           "check_subset", "warning_line", "restarts_option", "check_restarts"]

DATA_HELP = ("mnist1d, digits, an .npz with arrays x and y, or your own function "
             "MODULE:CALLABLE (called with split='train'|'test').")


# ----------------------------------------------------------------------------- output
def fail(error: Exception) -> NoReturn:
    """Print a ridgeline error without a traceback (one red line) and exit with status 2."""
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def progress_on() -> bool:
    """Whether commands show progress bars (off under ``--quiet``)."""
    return os.environ.get("RIDGELINE_QUIET") != "1"


def warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` for the command line: one line ``warning: <message>`` on
    stderr, without the category, source file and source line."""
    text = " ".join(str(message).split())
    typer.secho(f"warning: {text}", fg=typer.colors.YELLOW, err=True)


# ----------------------------------------------------------------------------- options
def model_option(default: str | None = None, help: str | None = None) -> Any:
    return typer.Option(default, "--model", help=help or (
        "The model the checkpoint's tensors belong to: your factory MODULE:CALLABLE (or mlp, "
        "cnn1d, resnet). Needed for files without a ridgeline sidecar (.pt state_dicts, plain "
        ".safetensors)."))


def model_args_option() -> Any:
    return typer.Option(None, "--model-args", help="Keyword arguments of --model as a JSON "
                                                   "object, e.g. '{\"width\": 64}'.")


def data_option(default: str = "mnist1d") -> Any:
    return typer.Option(default, "--data", help=DATA_HELP)


def data_args_option() -> Any:
    return typer.Option(None, "--data-args",
                        help="Keyword arguments of --data as a JSON object (built-in or your own).")


def restarts_option() -> Any:
    return typer.Option(None, "--restarts", help=(
        "Weight matching (--align weights): run the coordinate descent N times by iterated "
        "local search and keep the highest objective Σ⟨θ_A, π(θ_B)⟩. Default: the library's "
        "(1 for models without attention heads, more for transformers)."))


# ----------------------------------------------------------------------------- parsing
def parse_json_object(text: str | None, option: str) -> dict[str, Any]:
    """A JSON object given on the command line (``None`` → ``{}``)."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option} must be a JSON object such as '{{\"width\": 64}}'; {text!r} "
                          f"is not valid JSON ({exc.msg} at character {exc.pos}).") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object (keyword arguments), got "
                          f"{type(value).__name__} {text!r}.")
    return value


def parse_ints(text: str, option: str, *, minimum: int | None = 1) -> list[int]:
    """Comma-separated integers (``"256,256"``)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"{option} must be comma-separated integers such as 256,256; got "
                          f"{text!r}.") from exc
    if minimum is not None and any(v < minimum for v in values):
        raise ConfigError(f"{option} values must be ≥ {minimum}, got {text!r}.")
    return values


def parse_floats(text: str, option: str) -> list[float]:
    """Comma-separated numbers (``"0.01,0.03"``)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"{option} must be comma-separated numbers, got {text!r}.") from exc


def parse_key_values(items: list[str], option: str) -> dict[str, Any]:
    """``KEY=VALUE`` items; values are JSON when they parse (numbers, true, lists), else
    strings (``float16``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} takes KEY=VALUE, got {item!r}; e.g. {option} rho=0.05.")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value  # a plain string such as float16 or local
    return out


def check_subset(subset: int | None, option: str = "--subset") -> None:
    if subset is not None and subset < 1:
        raise ConfigError(f"{option} must be a positive number of examples, got {subset}; leave "
                          "it out to use every example.")


def check_restarts(restarts: int | None, align: str | None,
                   option: str = "--restarts") -> None:
    """``--restarts N``: an integer ≥ 1, and only with ``--align weights`` (the only matching
    that restarts)."""
    if restarts is None:
        return
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ConfigError(f"{option} must be an integer ≥ 1 (runs of weight matching; 1 is a "
                          f"single descent), got {restarts}; leave it out for the default.")
    if align != "weights":
        given = "no --align" if align is None else f"--align {align}"
        raise ConfigError(f"{option} applies to weight matching only; add --align weights "
                          f"(got {given}).")


def check_plot_path(path: Path | None, option: str = "--plot") -> None:
    """Before computing: the folder exists and matplotlib can write the file type."""
    if path is None:
        return
    check_output_file(path, option)
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in kinds:
        raise ConfigError(f"{option} {path}: cannot write a {'.' + suffix if suffix else 'file '}"
                          f"{'' if suffix else 'without an extension'} image; use one of "
                          f"{', '.join('.' + k for k in sorted(kinds))} (e.g. {path.stem}.png).")


def check_output_file(path: Path | None, option: str) -> None:
    """Before computing: ``path`` can be written (its folder exists; it is not a folder)."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file name inside it, e.g. "
                          f"{path / 'out'}{'.png' if option == '--plot' else ''}.")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: the folder {parent} does not exist; create it "
                          f"(mkdir -p {parent}) or choose another path.")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{option} {path}: the folder {parent} is not writable.")


# ----------------------------------------------------------------------------- loading
def load_model(checkpoint: Path, model: str | None = None, model_args: str | None = None):
    """The model in ``checkpoint`` (any format :func:`ridgeline.load` reads), built by
    ``--model``/``--model-args`` when given, else from the sidecar or Hugging Face config."""
    from ridgeline.checkpoints import is_huggingface_folder, load

    kwargs = parse_json_object(model_args, "--model-args")
    if kwargs and model is None:
        raise ConfigError("--model-args needs --model (the factory they are passed to).")
    if not progress_on() and is_huggingface_folder(checkpoint):
        try:  # transformers' own loading bars follow --quiet too
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    return load(checkpoint, factory=model, model_args=kwargs if model else None)


def load_data(name: str, split: str = "train", subset: int | None = None,
              args: str | dict[str, Any] | None = None):
    """A dataset split: a built-in dataset by name, an ``.npz`` with arrays ``x`` and ``y``, or
    user code ``MODULE:CALLABLE`` called with ``split=`` and ``args``; the first ``subset``
    examples when given."""
    import torch

    from ridgeline.data import Dataset, load_dataset

    check_subset(subset)
    if split not in ("train", "test"):
        raise ConfigError(f"--split must be 'train' or 'test', got {split!r}.")
    kwargs = args if isinstance(args, dict) else parse_json_object(args, "--data-args")
    if name.endswith(".npz"):
        import numpy as np

        if kwargs:
            raise ConfigError("--data-args applies to built-in datasets and MODULE:CALLABLE, not "
                              "to an .npz file.")
        path = Path(name)
        if not path.is_file():
            raise DataError(f"--data {name}: the file does not exist. Give an .npz with arrays x "
                            "(inputs) and y (targets), a built-in dataset (mnist1d, digits) or "
                            "MODULE:CALLABLE.")
        try:
            with np.load(path, allow_pickle=False) as archive:
                keys = sorted(archive.files)
                if "x" not in keys or "y" not in keys:
                    raise DataError(f"--data {name} must hold arrays named 'x' (inputs) and 'y' "
                                    f"(targets); it holds {keys}. Save it with "
                                    "numpy.savez(path, x=inputs, y=targets).")
                x, y = archive["x"], archive["y"]
        except DataError:
            raise
        except (OSError, ValueError) as exc:
            raise DataError(f"--data {name} is not a readable .npz of numeric arrays: "
                            f"{exc}") from exc
        if x.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
            raise DataError(f"--data {name}: x and y must be numeric, got {x.dtype} and {y.dtype}.")
        if x.shape[:1] != y.shape[:1] or x.ndim == 0:
            raise DataError(f"--data {name}: x has shape {x.shape} and y {y.shape}; both need one "
                            "row per example.")
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        regression = yt.is_floating_point()
        data = Dataset(xt.float(), yt if regression else yt.long(),
                       None if regression else int(yt.max()) + 1, path.stem)
    else:
        data = load_dataset(name, split, **kwargs)
    return data.subset(subset) if subset is not None else data

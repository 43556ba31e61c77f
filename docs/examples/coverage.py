"""The coverage table of docs/models.md: every instrument on every model family.

Each cell runs one instrument on one small model with its own small data, as a user would
(the model as it comes, no wrapper), and records whether it works (with the wall time on
this machine) or refuses (with ridgeline's message). A cell that fails with an error that
is not a ``ridgeline.errors`` error is reported as such: that is a bug.

Families: ridgeline's MLP, CNN, ResNet with BatchNorm and patch transformer on 64 MNIST-1D
examples; Hugging Face GPT-2 (next-token prediction on 32 random sequences of 8 tokens),
BERT (sequence classification) and ViT (image classification on random 8×8 images), from
tiny configs; and a user factory, ``make`` in the module ``mymodels`` defined below (a
model whose forward returns a dict with ``logits``).

Run: ``.venv/bin/python docs/examples/coverage.py`` (a few minutes on 2 CPU cores, one
thread). It rewrites the table between the markers in docs/models.md.
"""

from __future__ import annotations

import re
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import ridgeline
from ridgeline.errors import RidgelineError

DOCS = Path(__file__).resolve().parents[1]
START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"

# ----------------------------------------------------------------------------- a user module
USER_MODULE = '''
import torch
from torch import nn


class TwoTower(nn.Module):
    """A user's model: two towers summed, returning a dict (as many codebases do)."""

    def __init__(self, width):
        super().__init__()
        self.left = nn.Sequential(nn.Linear(40, width), nn.Tanh())
        self.right = nn.Sequential(nn.Linear(40, width), nn.ReLU())
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        features = self.left(x) + self.right(x)
        return {"logits": self.head(features), "features": features}


def make(width=32):
    return TwoTower(width)
'''
mymodels = types.ModuleType("mymodels")
exec(compile(USER_MODULE, "mymodels.py", "exec"), mymodels.__dict__)
sys.modules["mymodels"] = mymodels


# ----------------------------------------------------------------------------- families
def _mnist1d(n: int = 64):
    from ridgeline.data import mnist1d

    x, y = mnist1d("train").as_tuple()
    return x[:n], y[:n]


def _hf(kind: str):
    import transformers

    transformers.logging.set_verbosity_error()
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2,
                                         n_head=2, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64,
                                         max_position_embeddings=16, num_labels=3)
        return transformers.BertForSequenceClassification(config)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, num_labels=3)
    return transformers.ViTForImageClassification(config)


def _tokens(classes: int | None):
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 64, (32, 9), generator=gen)
    if classes is None:
        return seq[:, :-1], seq[:, 1:]
    return seq[:, :-1], torch.randint(0, classes, (32,), generator=gen)


def _images():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)


# name: (factory, data, a layer for feature_distance)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple], str]] = {
    "MLP": (lambda: ridgeline.models.mlp(40, [64, 64], 10), _mnist1d, "2"),
    "CNN": (lambda: ridgeline.models.cnn1d(1, [16, 16], 10), _mnist1d, "4"),
    "ResNet (BN)": (lambda: ridgeline.models.resnet(1, [8, 16], 10), _mnist1d, "stages"),
    "transformer": (lambda: ridgeline.models.transformer(40, 10, width=32), _mnist1d,
                    "blocks.1"),
    "HF GPT-2": (lambda: _hf("gpt2"), lambda: _tokens(None), "transformer.h.1"),
    "HF BERT": (lambda: _hf("bert"), lambda: _tokens(3), "bert.encoder.layer.1"),
    "HF ViT": (lambda: _hf("vit"), _images, "vit.layers.1"),
    "user factory": (lambda: mymodels.make(width=32), _mnist1d, "left"),
}


# ----------------------------------------------------------------------------- instruments
def _pair(make):
    torch.manual_seed(1)
    a = make().eval()
    torch.manual_seed(2)
    return a, make().eval()


def loss_and_gradient(make, data, layer):
    ridgeline.Objective(make().eval(), data).loss_and_grad()


def train_one_epoch(make, data, layer):
    ridgeline.train(make(), data, epochs=1, batch_size=16, lr=0.01, progress=False)


def hessian_top_eigenvalues(make, data, layer):
    from ridgeline.curvature import top_eigenvalues

    top_eigenvalues(make().eval(), data, k=2, tol=1e-2)


def hessian_trace(make, data, layer):
    from ridgeline.curvature import trace

    trace(make().eval(), data, rtol=0.2, max_matvecs=50)


def ggn_and_fisher_products(make, data, layer):
    from ridgeline.curvature import fisher, ggn

    model = make().eval()
    for build in (ggn, fisher):
        operator = build(model, data)
        operator.matvec(torch.randn(operator.shape[0]))


def sharpness_average(make, data, layer):
    from ridgeline.curvature import sharpness

    sharpness(make().eval(), data, kind="average", rho=0.05, samples=4)


def ntk(make, data, layer):
    from ridgeline.kernels import empirical_ntk

    empirical_ntk(make().eval(), data[0][:8])


def forward_gradient_random(make, data, layer):
    from ridgeline.gradients import forward_gradient

    forward_gradient(make().eval(), data, num_guesses=16)


def forward_gradient_local(make, data, layer):
    from ridgeline.gradients import forward_gradient

    forward_gradient(make().eval(), data, guess="local", num_guesses=1)


def linear_path(make, data, layer):
    from ridgeline.connectivity import interpolate

    interpolate(*_pair(make), data, points=5)


def weight_matching(make, data, layer):
    from ridgeline.connectivity import align

    align(*_pair(make), method="weights", example_input=data[0][:2])


def activation_matching(make, data, layer):
    from ridgeline.connectivity import align

    align(*_pair(make), method="activations", data=data)


def feature_distance(make, data, layer):
    from ridgeline.transport import feature_distance as distance

    distance(*_pair(make), data[0], layer=layer, projections=20)


def intrinsic_dimension(make, data, layer):
    from ridgeline.subspace import intrinsic_dimension as measure

    measure(make, data, dims=[20], epochs=1, batch_size=16, progress=False)


INSTRUMENTS = {
    "loss + gradient (`Objective`)": loss_and_gradient,
    "training, 1 epoch (`train`)": train_one_epoch,
    "Hessian top-2 (`top_eigenvalues`)": hessian_top_eigenvalues,
    "Hessian trace (`trace`)": hessian_trace,
    "GGN and Fisher products": ggn_and_fisher_products,
    "average sharpness (`sharpness`)": sharpness_average,
    "empirical NTK, 8 inputs": ntk,
    "forward gradient, random guesses": forward_gradient_random,
    "forward gradient, local guess": forward_gradient_local,
    "linear path (`interpolate`)": linear_path,
    "weight matching (`align`)": weight_matching,
    "activation matching (`align`)": activation_matching,
    "feature distance (`transport`)": feature_distance,
    "intrinsic dimension, d = 20": intrinsic_dimension,
}


# ----------------------------------------------------------------------------- run
def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.match(r"(.{20,220}?[.;])(\s|$)", text)
    return (match.group(1) if match else text[:220]).replace("|", "\\|")


def run() -> tuple[list[str], dict[str, dict[str, str]], list[str]]:
    torch.set_num_threads(1)
    cells: dict[str, dict[str, str]] = {}
    notes: list[str] = []
    with warnings.catch_warnings():  # warm-up, untimed: imports and first-call set-up
        warnings.simplefilter("ignore")
        for make, load, _ in FAMILIES.values():
            ridgeline.Objective(make().eval(), load()).loss()
        make, load, layer = FAMILIES["user factory"]
        for fn in INSTRUMENTS.values():
            try:
                fn(make, load(), layer)
            except Exception:  # noqa: BLE001, S110 - the timed run reports it
                pass
    for family, (make, load, layer) in FAMILIES.items():
        data = load()
        for instrument, fn in INSTRUMENTS.items():
            torch.manual_seed(0)
            began = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn(make, data, layer)
                cell = f"✓ {time.perf_counter() - began:.2f} s"
            except RidgelineError as exc:
                notes.append(f"{type(exc).__name__}: {_first_sentence(str(exc))}")
                cell = f"refuses [{len(notes)}]"
            except Exception as exc:  # noqa: BLE001 - reported as a failure in the table
                notes.append(f"**bug** {type(exc).__name__}: {_first_sentence(str(exc))}")
                cell = f"fails [{len(notes)}]"
            cells.setdefault(instrument, {})[family] = cell
            print(f"{family:14s} {instrument:38s} {cell}", flush=True)
    return list(FAMILIES), cells, notes


def table(families, cells, notes) -> str:
    lines = ["| instrument | " + " | ".join(families) + " |",
             "|---|" + "---|" * len(families)]
    for instrument, row in cells.items():
        lines.append(f"| {instrument} | " + " | ".join(row[f] for f in families) + " |")
    lines.append("")
    lines += [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    machine = (f"torch {torch.__version__}, one thread, on this project's shared 2-core "
               "CPU machine (other jobs running); times are wall seconds, after an untimed "
               "warm-up, and include building the model.")
    return "\n".join(lines) + "\n\n" + machine


def main() -> None:
    text = table(*run())
    page = DOCS / "models.md"
    current = page.read_text() if page.exists() else f"{START}\n{END}\n"
    before, _, rest = current.partition(START)
    _, _, after = rest.partition(END)
    page.write_text(f"{before}{START}\n{text}\n{END}{after}")
    print(text)


if __name__ == "__main__":
    main()

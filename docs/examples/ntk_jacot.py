"""Reproduce the numerical section of Jacot, Gabriel & Hongler (2018), Fig. 1.

Inputs on the unit circle x(γ) = (cos γ, sin γ); ReLU networks of depth L = 4 in Jacot et
al.'s counting (input, three hidden layers, output; ``depth=3`` hidden layers here) in NTK
parameterisation with bias scale β = 0.1, widths n = 500 and n = 10 000. We plot
Θ(x₀, x(γ)) with x₀ = (1, 0) for several initialisations, at initialisation and after 200
steps of full-batch gradient descent (learning rate 1) on the MSE loss of a small training
set, next to the infinite-width limit Θ^∞. Numbers: relative Frobenius error of the
empirical NTK (on a 64-point grid of the circle) to Θ^∞ at initialisation, and the kernel
drift during training, for widths 100 … 10 000.

Run: ``.venv/bin/python docs/examples/ntk_jacot.py`` (a few minutes on 2 CPU cores;
writes docs/images/ntk_jacot.png and docs/images/ntk_drift_width.png).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ridgeline.kernels import drift, empirical_ntk, infinite_ntk, relative_error  # noqa: E402
from ridgeline.models import mlp  # noqa: E402

IMAGES = Path(__file__).resolve().parents[1] / "images"
HIDDEN = 3  # Jacot et al.'s depth L = 4: layers 0 (input) … 4 (output)
BIAS_STD = 0.1
STEPS, LR = 200, 1.0
SEEDS = {100: 4, 500: 4, 2000: 3, 10000: 3}


def circle(angles: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)


def train_full_batch(model, x, y, steps: int, lr: float) -> None:
    """Gradient descent on ridgeline's mse loss (1/N) Σ ½ (f(x) − y)²."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = 0.5 * (model(x).squeeze(1) - y).pow(2).mean()
        loss.backward()
        optimizer.step()


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    gammas = torch.linspace(-math.pi, math.pi, 129)[:-1]
    curve_inputs = circle(gammas)
    grid = circle(torch.linspace(-math.pi, math.pi, 65)[:-1])  # for Frobenius errors
    train_gamma = torch.tensor([-2.5, -1.2, 0.4, 1.9])
    x_train = circle(train_gamma)
    y_train = x_train[:, 0] * x_train[:, 1]  # f*(x) = x₁x₂, as in Jacot et al.'s Fig. 2
    x0 = torch.tensor([[1.0, 0.0]])
    limit_curve = infinite_ntk(x0, curve_inputs, depth=HIDDEN, bias_var=BIAS_STD ** 2).flatten()
    limit_grid = infinite_ntk(grid, depth=HIDDEN, bias_var=BIAS_STD ** 2)

    curves: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    numbers: dict[int, dict[str, list[float]]] = {}
    for width, seeds in SEEDS.items():
        numbers[width] = {"error_init": [], "error_trained": [], "drift": [], "change": []}
        curves[width] = []
        for seed in range(seeds):
            began = time.perf_counter()
            torch.manual_seed(seed)
            net = mlp(2, [width] * HIDDEN, 1, parameterization="ntk", activation="relu",
                      bias_std=BIAS_STD)
            k0 = empirical_ntk(net, grid)
            c0 = empirical_ntk(net, x0, curve_inputs).flatten()
            train_full_batch(net, x_train, y_train, STEPS, LR)
            k1 = empirical_ntk(net, grid)
            c1 = empirical_ntk(net, x0, curve_inputs).flatten()
            numbers[width]["error_init"].append(relative_error(k0, limit_grid))
            numbers[width]["error_trained"].append(relative_error(k1, limit_grid))
            numbers[width]["drift"].append(drift(k0, k1))
            numbers[width]["change"].append(relative_error(k1, k0))
            curves[width].append((c0, c1))
            print(f"width {width:5d} seed {seed}: rel. error at init "
                  f"{numbers[width]['error_init'][-1]:.4f}, after training "
                  f"{numbers[width]['error_trained'][-1]:.4f}, drift {numbers[width]['drift'][-1]:.2e},"
                  f" ‖ΔΘ‖/‖Θ₀‖ {numbers[width]['change'][-1]:.4f} ({time.perf_counter() - began:.1f} s)",
                  flush=True)
            del net

    def mean_std(values: list[float]) -> str:
        t = torch.tensor(values)
        return f"{float(t.mean()):.3g} ± {float(t.std()) if len(values) > 1 else 0.0:.2g}"

    print("\n| width | seeds | ‖Θ₀ − Θ^∞‖/‖Θ^∞‖ | ‖Θ_T − Θ^∞‖/‖Θ^∞‖ | drift 1 − cos(Θ₀, Θ_T) | ‖Θ_T − Θ₀‖/‖Θ₀‖ |")
    print("|---|---|---|---|---|---|")
    for width, values in numbers.items():
        print(f"| {width} | {len(values['drift'])} | {mean_std(values['error_init'])} | "
              f"{mean_std(values['error_trained'])} | {mean_std(values['drift'])} | "
              f"{mean_std(values['change'])} |")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, width in zip(axes, (500, 10000)):
        for index, (c0, c1) in enumerate(curves[width]):
            ax.plot(gammas, c0, color="C0", lw=1, label=f"n = {width}, t = 0" if index == 0 else None)
            ax.plot(gammas, c1, color="C1", lw=1, ls="--",
                    label=f"n = {width}, t = {STEPS}" if index == 0 else None)
        ax.plot(gammas, limit_curve, color="k", lw=1.5, label="n → ∞")
        ax.scatter(train_gamma, [0] * len(train_gamma), marker="x", color="C3", zorder=3,
                   label="training inputs")
        ax.set_xlabel("γ")
        ax.set_title(f"width {width}")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("Θ(x₀, x(γ))")
    fig.suptitle("Empirical NTK of depth-4 ReLU networks on the unit circle (Jacot et al. Fig. 1)")
    fig.tight_layout()
    IMAGES.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMAGES / "ntk_jacot.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    widths = sorted(numbers)
    for key, label, marker in (("error_init", "‖Θ₀ − Θ^∞‖/‖Θ^∞‖ (init)", "o"),
                               ("change", "‖Θ_T − Θ₀‖/‖Θ₀‖ (training)", "s"),
                               ("drift", "drift 1 − cos(Θ₀, Θ_T)", "^")):
        means = [float(torch.tensor(numbers[w][key]).mean()) for w in widths]
        ax.loglog(widths, means, marker=marker, label=label)
    reference = [numbers[widths[0]]["error_init"][0] * math.sqrt(widths[0] / w) for w in widths]
    ax.loglog(widths, reference, "k:", lw=1, label="∝ 1/√n")
    ax.set_xlabel("width n")
    ax.set_ylabel("relative size")
    ax.legend(fontsize=8)
    ax.set_title("Distance to the limit and kernel motion vs width")
    fig.tight_layout()
    fig.savefig(IMAGES / "ntk_drift_width.png", dpi=120)
    plt.close(fig)
    print(f"wrote {IMAGES / 'ntk_jacot.png'} and {IMAGES / 'ntk_drift_width.png'}")


if __name__ == "__main__":
    sys.exit(main())

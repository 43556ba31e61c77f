"""Figure for docs/sweeps.md from a finished sweep of docs/examples/sweep_sharpness.toml.

    ridgeline sweep docs/examples/sweep_sharpness.toml --workers 2 --out runs/sharpness
    python docs/examples/sweep_figure.py runs/sharpness docs/images/sweep_sharpness.png

Four measures against the error gap, coloured by (lr, batch size); the last panel is the
training error against the same gap, the baseline every measure is compared with.
"""

from __future__ import annotations

import sys

from ridgeline.plotting import new_figure
from ridgeline.study import ResultStore
from ridgeline.sweep.correlation import kendall_tau


def main(run_dir: str, out: str) -> None:
    latest = ResultStore(run_dir).latest()
    result = latest["generalization_correlation"]["result"]
    models = result["models"]
    train_error = {m["id"]: latest[f"model:{m['id']}"]["result"]["train_error"] for m in models}
    panels = [*result["correlations"], "train error"]
    fig, axes = new_figure(3.2 * len(panels), 3.2, ncols=len(panels))
    groups = sorted({(m["settings"]["training.lr"], m["settings"]["training.batch_size"])
                     for m in models})
    for name, ax in zip(panels, axes):
        for i, (lr, bs) in enumerate(groups):
            chosen = [m for m in models if (m["settings"]["training.lr"],
                                            m["settings"]["training.batch_size"]) == (lr, bs)]
            xs = [train_error[m["id"]] if name == "train error" else m["measures"][name]
                  for m in chosen]
            ax.scatter(xs, [m["gaps"]["error"] for m in chosen], s=14, color=f"C{i}",
                       label=f"lr {lr}, batch {bs}")
        xs = [train_error[m["id"]] if name == "train error" else m["measures"][name]
              for m in models]
        tau = kendall_tau(xs, [m["gaps"]["error"] for m in models])
        ax.set_title(f"{name}: τ = {tau:+.2f}", fontsize=9)
        ax.set_xlabel(name)
    axes[0].set_ylabel("test − train error")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

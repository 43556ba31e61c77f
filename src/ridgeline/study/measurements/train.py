"""Measurement ``train``: train one model of the study and keep its learning curves."""

from __future__ import annotations

from ridgeline.study.figures import figure_html, new_figure, table_html
from ridgeline.study.registry import Options, register_measurement


class TrainOptions(Options):
    model: str


def _summary(record: dict) -> dict:
    final = record["result"]["history"][-1]
    return {"model": record["options"]["model"], "epochs": final["epoch"],
            "train loss": final.get("train_loss"), "train acc": final.get("train_accuracy"),
            "test loss": final.get("eval_loss"), "test acc": final.get("eval_accuracy"),
            "ms/step": 1000 * record["result"]["time_per_step"]}


def _report(record: dict) -> str:
    history = record["result"]["history"]
    fig, (ax_loss, ax_acc) = new_figure(9, 3.2, ncols=2)
    epochs = [h["epoch"] for h in history]
    for key, ax in (("loss", ax_loss), ("accuracy", ax_acc)):
        for split, label in (("train", "train"), ("eval", "test")):
            values = [h.get(f"{split}_{key}") for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [float("nan") if v is None else v for v in values], marker="o",
                        ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
    ax_loss.set_title(f"model {record['options']['model']}")
    return figure_html(fig) + table_html([_summary(record)])


@register_measurement("train", options=TrainOptions, report=_report, summary=_summary,
                      description="Train a model; record loss and accuracy per epoch.")
def run_train(ctx, options: TrainOptions) -> dict:
    """Train model ``options.model`` with the study's training settings; save checkpoints."""
    from ridgeline.train import save, train

    settings = ctx.config.training_for(options.model)
    model = ctx.build(options.model)
    save(model, ctx.checkpoint_path(options.model, initial=True),
         metadata={"model": options.model, "stage": "init"})
    result = train(model, ctx.dataset("train"), optimizer=settings.optimizer, lr=settings.lr,
                   momentum=settings.momentum, weight_decay=settings.weight_decay,
                   epochs=settings.epochs, batch_size=settings.batch_size, seed=settings.seed,
                   loss=settings.loss, scheduler=settings.scheduler,
                   eval_data=ctx.dataset("test"), progress=ctx.progress, **settings.options)
    save(model, ctx.checkpoint_path(options.model),
         metadata={"model": options.model, "stage": "trained"})
    return {**result.to_dict(), "checkpoint": str(ctx.checkpoint_path(options.model).name)}

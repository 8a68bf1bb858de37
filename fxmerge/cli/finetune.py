"""``compress --data DIR``: image folders, fine-tuning of the linearized model, accuracy.

``DIR/train/CLASS/*`` and ``DIR/val/CLASS/*`` (:func:`fxmerge.data.image_folder`)
feed the importance estimator and fine-tune the linearized model; the original,
linearized and fine-tuned models' validation accuracy goes into the report.
Under ``torchrun`` the fine-tune runs with DistributedDataParallel on each rank's
device and the accuracies are counted on each rank's share of the images and summed
(:mod:`fxmerge.train`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from fxmerge.cli.arguments import non_negative_int, positive_float, positive_int
from fxmerge.cli.common import outputs, say, show_progress
from fxmerge.cli.errors import CLIError
from fxmerge.cli.models import format_shape
from fxmerge.data import DataError, image_folder
from fxmerge.train import accuracy, finetune


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and fine-tuning")
    data.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DIR",
        help="image folders DIR/train/CLASS/* and DIR/val/CLASS/*",
    )
    data.add_argument(
        "--finetune-epochs",
        type=non_negative_int,
        default=1,
        metavar="N",
        help="fine-tuning epochs with --data (default 1; 0: none)",
    )
    data.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        metavar="N",
        help="batch size for fine-tuning and evaluation (default 32)",
    )
    data.add_argument(
        "--lr",
        type=positive_float,
        default=0.01,
        help="fine-tuning learning rate (SGD, cosine schedule; default 0.01)",
    )
    data.add_argument(
        "--distill",
        action="store_true",
        help="also distil from the original model while fine-tuning",
    )
    data.add_argument(
        "--importance-batches",
        type=positive_int,
        default=8,
        metavar="N",
        help="training batches the importance estimator reads (default 8; with --importance paper, "
        "the size of holdout-train and of holdout-val each)",
    )
    data.add_argument(
        "--workers",
        type=non_negative_int,
        default=2,
        metavar="N",
        help="data-loading processes (default 2)",
    )


def image_data(args: argparse.Namespace, model: nn.Module, x) -> tuple:
    """Train/val loaders for ``--data``, checked against the model's input and output."""
    if isinstance(x, tuple) or x.dim() != 4:
        raise CLIError(
            f"--data needs a model with one image input (--input-shape N,C,H,W), not {format_shape(args.input_shape)}"
        )
    try:
        train, val = image_folder(args.data, tuple(x.shape), args.batch_size, workers=args.workers)
    except DataError as exc:
        raise CLIError(str(exc)) from exc
    _check_classifier(args, model, x, len(train.dataset.classes))
    say(
        f"data: {len(train.dataset)} training and {len(val.dataset)} validation images, "
        f"{len(train.dataset.classes)} classes"
    )
    return train, val


def _check_classifier(args: argparse.Namespace, model: nn.Module, x, classes: int) -> None:
    """``--data`` fine-tunes a classifier: one (batch, classes) output with room for every class."""
    try:
        out = outputs(model.eval(), x)
    except Exception as exc:
        raise CLIError(
            f"running {type(model).__name__} on an input of shape {format_shape(args.input_shape)} failed "
            f"({type(exc).__name__}: {exc}); check --input-shape"
        ) from exc
    if len(out) != 1 or out[0].dim() != 2:
        raise CLIError(
            "--data fine-tunes a classifier: the model must return one (batch, classes) tensor, "
            f"it returns {[tuple(t.shape) for t in out]}"
        )
    if out[0].shape[1] < classes:
        raise CLIError(
            f"{args.data} has {classes} classes but the model has only {out[0].shape[1]} outputs; "
            "give the model one output per class folder"
        )


def finetune_and_score(
    args: argparse.Namespace, model: nn.Module, linear: nn.Module, train, val, device: str
) -> dict[str, float]:
    """Accuracy of ``model`` and of ``linear``; fine-tune ``linear`` on ``train`` (in place); its accuracy after.

    Both models run on ``device`` (batches are moved there as they are read), then go back to the CPU.
    """
    teacher = model.eval() if args.distill else None
    images = len(val.dataset)
    linear.to(device)
    model.to(device)
    try:
        say(f"evaluating the original and the linearized model on {images} validation images")
        scores = {
            "original": accuracy(model.eval(), val),
            "linearized": accuracy(linear, val),
        }
        if args.finetune_epochs:
            distill = " with distillation" if teacher is not None else ""
            say(f"fine-tuning the linearized model for {args.finetune_epochs} epoch(s){distill}")
            finetune(
                linear,
                train,
                epochs=args.finetune_epochs,
                lr=args.lr,
                teacher=teacher,
                progress=show_progress(args),
            )
            scores["fine-tuned"] = accuracy(linear, val)
    finally:
        linear.to("cpu")
        model.to("cpu")
    return scores


def accuracy_markdown(scores: dict[str, float], images: int) -> str:
    lines = [
        f"## Accuracy (top-1, {images} validation images)",
        "",
        "| model | accuracy |",
        "|---|---|",
    ]
    names = {
        "original": "original",
        "linearized": "linearized, before fine-tuning",
        "fine-tuned": "fine-tuned (= merged)",
    }
    lines += [f"| {names.get(k, k)} | {v:.2%} |" for k, v in scores.items()]
    return "\n".join(lines) + "\n"

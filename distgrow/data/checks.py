"""Checks of a loaded data set against the model that will train on it (before a run starts)."""

from __future__ import annotations

from collections.abc import Callable

from distgrow.data.containers import DataBundle

__all__ = ["CLASS_INDEX_LOSSES", "check_class_labels"]

# loss.name values whose targets are class indices into the model's outputs (auto: for class
# labels; a user's own loss may read its targets any way it likes).
CLASS_INDEX_LOSSES = ("auto", "cross_entropy", "nll")


def check_class_labels(
    data: DataBundle, loss_name: str, outputs: Callable[[], int | None], where: str
) -> None:
    """Refuse a class label the model has no output for.

    Training would start, write its run directory, and fail at the first batch holding that
    label (an ``IndexError`` deep in the loss); this says so before anything is written.

    Args:
        data: The loaded data set (its training and validation labels).
        loss_name: ``loss.name``: only losses that index the outputs with the labels are checked.
        outputs: The model's number of outputs per sample (called only when there is something
            to check); None: unknown (the model failed or gave no tensor), nothing is checked.
        where: The data's file or name, for the message.

    Raises:
        ValueError: One line naming the label, its split, the model's outputs and the fix.
    """
    if data.task != "classification" or loss_name not in CLASS_INDEX_LOSSES:
        return
    width = outputs()
    if width is None:
        return
    for split, dataset in (("training", data.train), ("validation", data.val)):
        labels = dataset.y
        if labels.numel() == 0 or labels.is_floating_point():
            continue
        top = int(labels.max())
        if top < width:
            continue
        raise ValueError(
            f"{where}: class label {top:,} (in the {split} split) is beyond the model's "
            f"{width:,} outputs (classes 0..{width - 1:,}). Fix: number the classes 0..C-1 "
            f"with C <= {width:,}, or give the model one output per class."
        )

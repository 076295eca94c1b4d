"""Learning curves and confusion matrices as PNG (MLflow artifacts, DVC image plots)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def learning_curves(history: pd.DataFrame, path: Path) -> None:
    """Train/val loss and val accuracy per epoch, one line per seed.

    `history` columns: seed, epoch, train_loss, val_loss, val_accuracy.
    """
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for seed, rows in history.groupby("seed"):
        line = ax_loss.plot(rows["epoch"], rows["train_loss"], label=f"seed {seed} train")[0]
        ax_loss.plot(
            rows["epoch"], rows["val_loss"], "--", color=line.get_color(), label=f"seed {seed} val"
        )
        ax_acc.plot(
            rows["epoch"], rows["val_accuracy"], color=line.get_color(), label=f"seed {seed}"
        )
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss (dashed: validation)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
    ax_loss.legend(fontsize=7)
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_matrix_plot(matrix: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    """Counts with row-normalised shading; rows true, columns predicted."""
    size = max(4.0, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(
                j,
                i,
                int(matrix[i, j]),
                ha="center",
                va="center",
                color="white" if shares[i, j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

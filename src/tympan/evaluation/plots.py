"""Evaluation figures as PNG (MLflow artifacts, DVC image plots): learning curves, confusion
matrix, ROC and precision-recall curves, spectrograms of the worst predictions, regression fit.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def learning_curves(history: pd.DataFrame, path: Path) -> None:
    """Train/val loss and val accuracy per epoch, one line per member (seed, or fold and seed).

    `history` columns: member (optional), seed, epoch, train_loss, val_loss, val_accuracy.
    """
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    key = "member" if "member" in history.columns else "seed"
    score = "val_accuracy" if "val_accuracy" in history.columns else "val_mae"
    for member, rows in history.groupby(key, sort=False):
        name = f"seed {member}" if str(member).isdigit() else str(member)
        line = ax_loss.plot(rows["epoch"], rows["train_loss"], label=f"{name} train")[0]
        ax_loss.plot(
            rows["epoch"], rows["val_loss"], "--", color=line.get_color(), label=f"{name} val"
        )
        ax_acc.plot(rows["epoch"], rows[score], color=line.get_color(), label=name)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss (dashed: validation)")
    label = score.removeprefix("val_")
    ax_acc.set(xlabel="epoch", ylabel=label, title=f"validation {label}")
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


def curves_plot(roc: pd.DataFrame, pr: pd.DataFrame, path: Path, title: str) -> None:
    """ROC (left) and precision-recall (right), one line per class; frames from metrics.py."""
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(10, 4.5))
    for name, rows in roc.groupby("class", sort=False):
        ax_roc.plot(rows["fpr"], rows["tpr"], label=str(name))
    for name, rows in pr.groupby("class", sort=False):
        ax_pr.plot(rows["recall"], rows["precision"], label=str(name))
    ax_roc.plot([0, 1], [0, 1], ":", color="grey")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (one vs rest)")
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall (one vs rest)")
    for ax in (ax_roc, ax_pr):
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def spectrogram_plot(features: np.ndarray, path: Path, title: str, hop_s: float) -> None:
    """One clip's features `(channels, n_bins, frames)` as an image (first channel), time in s."""
    image = np.asarray(features, dtype=np.float32)[0]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    shown = ax.imshow(
        image,
        origin="lower",
        aspect="auto",
        cmap="magma",
        extent=(0.0, image.shape[1] * hop_s, 0, image.shape[0]),
    )
    fig.colorbar(shown, ax=ax, label="dB")
    ax.set(xlabel="time (s)", ylabel="mel bin")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def regression_plots(targets: np.ndarray, predicted: np.ndarray, path: Path, title: str) -> None:
    """Predicted against true (left, with the identity line) and residuals (right)."""
    fig, (ax_fit, ax_res) = plt.subplots(1, 2, figsize=(10, 4.5))
    ax_fit.scatter(targets, predicted, s=8, alpha=0.6)
    low, high = float(np.min(targets)), float(np.max(targets))
    ax_fit.plot([low, high], [low, high], ":", color="grey")
    ax_fit.set(xlabel="true", ylabel="predicted", title="predicted vs true")
    ax_res.scatter(predicted, predicted - targets, s=8, alpha=0.6)
    ax_res.axhline(0.0, linestyle=":", color="grey")
    ax_res.set(xlabel="predicted", ylabel="predicted - true", title="residuals")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

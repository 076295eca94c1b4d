"""Classification metrics computed from class probabilities."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)


def classification_metrics(targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1/precision/recall, and ROC AUC when binary.

    `targets`: `(clips,)` class indices; `probs`: `(clips, n_classes)`.
    """
    n_classes = probs.shape[1]
    predicted = probs.argmax(axis=1)
    labels = np.arange(n_classes)
    out = {
        "accuracy": float(accuracy_score(targets, predicted)),
        "f1_macro": float(
            f1_score(targets, predicted, labels=labels, average="macro", zero_division=0)
        ),
        "precision": float(
            precision_score(targets, predicted, labels=labels, average="macro", zero_division=0)
        ),
        "recall": float(
            recall_score(targets, predicted, labels=labels, average="macro", zero_division=0)
        ),
    }
    if n_classes == 2 and len(np.unique(targets)) == 2:
        out["roc_auc"] = float(roc_auc_score(targets, probs[:, 1]))
    return out


def confusion(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """`(n_classes, n_classes)` counts, rows true, columns predicted."""
    n_classes = probs.shape[1]
    return confusion_matrix(targets, probs.argmax(axis=1), labels=np.arange(n_classes))

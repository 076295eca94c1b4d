"""Classification and regression metrics, per-class tables, ROC and precision-recall curves.

Inputs are plain arrays: class indices `(clips,)` with probabilities `(clips, n_classes)`, or
true and predicted values `(clips,)` for regression. Everything returned is JSON-ready.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    mean_absolute_error,
    precision_recall_curve,
    precision_recall_fscore_support,
    r2_score,
    roc_auc_score,
    roc_curve,
)


def classification_metrics(
    targets: np.ndarray, probs: np.ndarray, positive: int | None = None
) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro precision/recall/F1, weighted F1, and ROC AUC; with
    `positive` (a class index) also that class's own F1, precision and recall
    (`positive_f1`, `positive_precision`, `positive_recall`, as S1 reports its deceptive class).

    `targets`: `(clips,)` class indices; `probs`: `(clips, n_classes)`. ROC AUC is the
    class 1's when binary and the macro one-vs-rest AUC otherwise; it is left out when a
    class is missing from `targets` (undefined there).
    """
    n_classes = probs.shape[1]
    predicted = probs.argmax(axis=1)
    labels = np.arange(n_classes)
    precision, recall, f1, _ = precision_recall_fscore_support(
        targets, predicted, labels=labels, average="macro", zero_division=0
    )
    _, _, f1_weighted, _ = precision_recall_fscore_support(
        targets, predicted, labels=labels, average="weighted", zero_division=0
    )
    out = {
        "accuracy": float(accuracy_score(targets, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(targets, predicted)),
        "f1_macro": float(f1),
        "f1_weighted": float(f1_weighted),
        "precision": float(precision),
        "recall": float(recall),
    }
    if positive is not None:
        one_p, one_r, one_f1, _ = precision_recall_fscore_support(
            targets, predicted, labels=[positive], average=None, zero_division=0
        )
        out.update(
            positive_f1=float(one_f1[0]),
            positive_precision=float(one_p[0]),
            positive_recall=float(one_r[0]),
        )
    if len(np.unique(targets)) == n_classes and n_classes >= 2:
        if n_classes == 2:
            out["roc_auc"] = float(roc_auc_score(targets, probs[:, 1]))
        else:
            # sklearn wants rows that sum to 1; float16/float32 rounding can break that.
            scores = probs / probs.sum(axis=1, keepdims=True)
            out["roc_auc"] = float(
                roc_auc_score(targets, scores, multi_class="ovr", average="macro", labels=labels)
            )
    return out


def per_class(targets: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, dict]:
    """`{label: {accuracy, precision, f1, support}}`; a class's accuracy is its recall."""
    predicted = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predicted, labels=np.arange(len(labels)), average=None, zero_division=0
    )
    return {
        label: {
            "accuracy": float(recall[i]),
            "precision": float(precision[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }


def confusion(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """`(n_classes, n_classes)` counts, rows true, columns predicted."""
    n_classes = probs.shape[1]
    return confusion_matrix(targets, probs.argmax(axis=1), labels=np.arange(n_classes))


def _curve_classes(targets: np.ndarray, n_classes: int) -> list[int]:
    """Classes that get a curve: the positive one when binary, each present one otherwise."""
    present = set(np.unique(targets).tolist())
    candidates = [1] if n_classes == 2 else range(n_classes)
    # A one-vs-rest curve needs both positives and negatives.
    return [c for c in candidates if c in present and len(present) > 1]


def roc_curves(targets: np.ndarray, probs: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """One-vs-rest ROC curve per class: columns class, fpr, tpr, threshold."""
    frames = []
    for c in _curve_classes(targets, probs.shape[1]):
        fpr, tpr, threshold = roc_curve(targets == c, probs[:, c])
        frames.append(
            pd.DataFrame({"class": labels[c], "fpr": fpr, "tpr": tpr, "threshold": threshold})
        )
    return pd.concat(frames, ignore_index=True) if frames else _empty("fpr", "tpr")


def pr_curves(targets: np.ndarray, probs: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """One-vs-rest precision-recall curve per class: columns class, recall, precision, threshold."""
    frames = []
    for c in _curve_classes(targets, probs.shape[1]):
        precision, recall, threshold = precision_recall_curve(targets == c, probs[:, c])
        frames.append(
            pd.DataFrame(
                {
                    "class": labels[c],
                    "recall": recall,
                    "precision": precision,
                    # sklearn gives one threshold fewer than points; the last point has none.
                    "threshold": np.append(threshold, np.nan),
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else _empty("recall", "precision")


def _empty(x: str, y: str) -> pd.DataFrame:
    return pd.DataFrame(columns=["class", x, y, "threshold"])


def regression_metrics(targets: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R^2 of `predicted` against `targets`, both `(clips,)`."""
    targets = np.asarray(targets, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    out = {
        "mae": float(mean_absolute_error(targets, predicted)),
        "rmse": float(np.sqrt(np.mean((targets - predicted) ** 2))),
    }
    if len(targets) > 1 and np.ptp(targets) > 0:
        out["r2"] = float(r2_score(targets, predicted))
    return out


def worst_predictions(targets: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` items whose true class got the lowest probability, worst first."""
    true_prob = probs[np.arange(len(targets)), targets]
    order = np.argsort(true_prob, kind="stable")
    return order[: min(k, len(order))]


def breakdown(
    targets: np.ndarray, probs: np.ndarray, values: pd.Series
) -> dict[str, dict[str, float]]:
    """Accuracy and macro F1 (over the classes present) per value of a side attribute.

    `values`: `(clips,)`, aligned with `targets`; each value also gets its count `n`.
    """
    out: dict[str, dict[str, float]] = {}
    values = values.astype(str).to_numpy()
    predicted = probs.argmax(axis=1)
    for value in sorted(set(values), key=_natural):
        mask = values == value
        _, _, f1, _ = precision_recall_fscore_support(
            targets[mask],
            predicted[mask],
            labels=np.unique(targets[mask]),
            average="macro",
            zero_division=0,
        )
        out[value] = {
            "n": int(mask.sum()),
            "accuracy": float(accuracy_score(targets[mask], predicted[mask])),
            "f1_macro": float(f1),
        }
    return out


def _natural(value: str) -> tuple:
    """Numbers in numeric order (-6 before 0 before 12), then text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)

"""The evaluate stage's outputs: metrics JSON for DVC and MLflow, plot data, figures.

`classification_report` takes every seed's test probabilities and writes, under `metrics/`:
    headline.json   the one DVC metrics file: the registry metric for the ensemble with its
                    seed mean and std, two companion metrics and the test size (what
                    `dvc metrics show`, `dvc metrics diff` and `dvc exp show` compare)
    test.json       every metric per seed, seed mean and std, and the probability-averaged
                    ensemble (S1's method)
    classes.json    per-class accuracy, precision, F1 and support of the ensemble
    breakdown.json  accuracy and macro F1 per value of each `evaluate.breakdown` column
(the last three are tables, not DVC metrics: one column per class or attribute value would
make `dvc metrics show` and `dvc exp show` unreadable; their plots are classes.csv and
breakdown.csv) and under `plots/`: confusion.csv (DVC confusion template) and confusion.txt,
roc.csv and pr.csv (every class's one-vs-rest curve in one table, one DVC plot each),
classes.csv and breakdown.csv (bars), worst.csv with worst/*.png (the k worst predictions with
their spectrograms), test_predictions.csv, and the figures confusion.png and curves.png.
`regression_report` is the same for a regression model: mae/rmse/r2, scatter.csv,
and in curves.png the predicted-vs-true and residual plot (dvc.yaml declares one set of
evaluate outputs for every task, so the file keeps its name; roc.csv and pr.csv hold a header).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tympan.evaluation import metrics as m
from tympan.evaluation.plots import (
    confusion_matrix_plot,
    curves_plot,
    regression_plots,
    spectrogram_plot,
)


class EvaluationError(ValueError):
    """A report that cannot be made from the inputs (e.g. a breakdown column that is absent)."""


@dataclass(frozen=True)
class HeldOut:
    """The scored clips: `index` rows (path, label, side attributes...) aligned with `targets`
    `(clips,)` and `features`, indexable by clip `(clips, C, n_bins, frames)` (read for the
    worst predictions' spectrograms only)."""

    index: pd.DataFrame
    targets: np.ndarray
    labels: list[str]
    features: Any
    hop_s: float


def per_recording(
    index: pd.DataFrame,
    per_seed_probs: dict[str, np.ndarray],
    how: str = "mean",
    renormalise: bool = True,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Combine window probabilities per recording (`path`), keeping the recordings' order.

    `index`: one row per window `(windows,)`; probabilities `(windows, n_classes)`. -> the
    position of each recording's first window, and `(recordings, n_classes)` per seed (mean,
    or max renormalised to sum to 1; `renormalise=False` for regression predictions).
    """
    codes, first = np.unique(index["path"].to_numpy(), return_index=True)
    order = np.argsort(first)
    first = first[order]
    position = {path: i for i, path in enumerate(codes[order])}
    member = index["path"].map(position).to_numpy()
    out = {}
    for seed, probs in per_seed_probs.items():
        combined = np.zeros((len(first), probs.shape[1]))
        if how == "max":
            combined[:] = -np.inf
            np.maximum.at(combined, member, probs)
            if renormalise:
                combined /= combined.sum(axis=1, keepdims=True)
        else:
            np.add.at(combined, member, probs)
            combined /= np.bincount(member, minlength=len(first))[:, None]
        out[seed] = combined
    return first, out


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def safe_name(text: str) -> str:
    """A class label or file stem usable as a file name."""
    return re.sub(r"[^\w.-]+", "_", text).strip("._") or "_"


def seed_summary(per_seed: dict[str, dict[str, float]]) -> tuple[dict, dict]:
    """Mean and population std across seeds of every metric all seeds have."""
    names = set.intersection(*(set(s) for s in per_seed.values()))
    first = next(iter(per_seed.values()))
    names_in_order = [k for k in first if k in names]
    mean = {k: statistics.fmean(s[k] for s in per_seed.values()) for k in names_in_order}
    std = {k: statistics.pstdev(s[k] for s in per_seed.values()) for k in names_in_order}
    return mean, std


def summarise(per_seed: dict[str, dict[str, float]], ensemble: dict[str, float], n: int) -> dict:
    """test.json's content: every seed, their mean and std, and the ensemble's metrics."""
    mean, std = seed_summary(per_seed)
    return {
        "n_test": n,
        "ensemble": ensemble,
        "seed_mean": mean,
        "seed_std": std,
        "seeds": per_seed,
    }


# The metric that accompanies the registry metric in headline.json: the first of these that
# is not the registry metric and was computed.
COMPANIONS = ("accuracy", "f1_macro", "mae", "r2")
# With `evaluate.positive_class` (S1), that class's F1, precision and recall head the headline,
# the macro ones beside them.
POSITIVE_HEADLINE = (
    "positive_f1",
    "positive_precision",
    "positive_recall",
    "f1_macro",
    "precision",
    "recall",
)


def headline(results: dict, metric: str) -> dict[str, float]:
    """headline.json: the registry metric of the ensemble (`test_<metric>`), its mean and
    std over the members (`seed_mean`, `seed_std`: seeds, or folds x seeds with CV), one
    companion metric of the ensemble (`COMPANIONS`), or with a positive class the
    `POSITIVE_HEADLINE` metrics, and `n_test`.

    Few keys with short names on purpose: `dvc metrics show` and `dvc exp show` print one
    column per key, and these stay under 100 characters wide.
    """
    ensemble = results["ensemble"]
    if metric not in ensemble:
        raise EvaluationError(
            f"register.metric={metric!r} was not computed for this test set "
            f"(have: {', '.join(ensemble)})"
        )
    if "positive_f1" in ensemble:
        companions = [k for k in POSITIVE_HEADLINE if k != metric]
    else:
        companions = [k for k in COMPANIONS if k in ensemble and k != metric][:1]
    return {
        f"test_{metric}": ensemble[metric],
        "seed_mean": results["seed_mean"][metric],
        "seed_std": results["seed_std"][metric],
        **{f"test_{k}": ensemble[k] for k in companions},
        "n_test": results["n_test"],
    }


def positive_index(labels: list[str], positive: str | None) -> int | None:
    """The class index of `evaluate.positive_class` (None when unset)."""
    if positive is None:
        return None
    if positive not in labels:
        raise EvaluationError(
            f"evaluate.positive_class={positive!r} is not a class of this model "
            f"(classes: {', '.join(labels)})"
        )
    return labels.index(positive)


def breakdown_table(by_attribute: dict[str, dict[str, dict]]) -> pd.DataFrame:
    """breakdown.json as one bar-chart table: a row per attribute value, named
    `attribute=value` (`slice`), then `attribute`, `value` and the value's metrics."""
    rows = [
        {"slice": f"{attribute}={value}", "attribute": attribute, "value": value, **scores}
        for attribute, values in by_attribute.items()
        for value, scores in values.items()
    ]
    return pd.DataFrame(rows, columns=None if rows else ["slice", "attribute", "value"])


def classification_report(
    test: HeldOut,
    per_seed_probs: dict[str, np.ndarray],
    metric: str,
    breakdown_by: tuple[str, ...],
    worst_k: int,
    metrics_dir: Path,
    plots: Path,
    members: dict[str, dict[str, float]] | None = None,
    extra: dict | None = None,
    positive: str | None = None,
) -> dict:
    """Write every metric file and plot (see the module docstring); -> test.json's content.

    The ensemble is the mean of `per_seed_probs`. `members` replaces the per-seed metrics
    when the members are not one per seed (CV: one per fold and seed, each on its own fold's
    test split, so the seed mean and std run over folds x seeds); `extra` joins test.json.
    `positive` (`evaluate.positive_class`) adds that class's F1, precision and recall to
    every metric set and to the headline.
    """
    missing = [c for c in breakdown_by if c not in test.index.columns]
    if missing:
        raise EvaluationError(
            f"evaluate.breakdown: column(s) {', '.join(missing)} not in the feature index "
            f"(have: {', '.join(test.index.columns)}); add them to the manifest"
        )
    targets, labels = test.targets, test.labels
    pos = positive_index(labels, positive)
    per_seed = members or {
        s: m.classification_metrics(targets, p, pos) for s, p in per_seed_probs.items()
    }
    probs = np.mean(list(per_seed_probs.values()), axis=0)
    results = summarise(per_seed, m.classification_metrics(targets, probs, pos), len(targets))
    if positive is not None:
        results["positive_class"] = positive
    results.update(extra or {})
    classes = m.per_class(targets, probs, labels)
    by_attribute = {c: m.breakdown(targets, probs, test.index[c]) for c in breakdown_by}
    _write_json(metrics_dir / "test.json", results)
    _write_json(metrics_dir / "headline.json", headline(results, metric))
    _write_json(metrics_dir / "classes.json", classes)
    _write_json(metrics_dir / "breakdown.json", by_attribute)

    plots.mkdir(parents=True, exist_ok=True)
    names = np.asarray(labels)
    predicted = probs.argmax(axis=1)
    table = pd.DataFrame(
        {
            "path": test.index["path"].to_numpy(),
            "actual": names[targets],
            "predicted": names[predicted],
            "confidence": probs.max(axis=1).round(4),
            "p_actual": probs[np.arange(len(targets)), targets].round(4),
        }
    )
    table[["actual", "predicted"]].to_csv(plots / "confusion.csv", index=False)
    table.to_csv(plots / "test_predictions.csv", index=False)
    pd.DataFrame(
        [{"class": k, **v} for k, v in classes.items()], columns=["class", "accuracy", "support"]
    ).to_csv(plots / "classes.csv", index=False)
    matrix = m.confusion(targets, probs)
    (plots / "confusion.txt").write_text(matrix_to_text(matrix, labels))
    confusion_matrix_plot(
        matrix,
        labels,
        plots / "confusion.png",
        f"test, ensemble of {len(per_seed_probs)}{' per fold, out of fold' if members else ''} "
        f"(accuracy {results['ensemble']['accuracy']:.3f})",
    )
    breakdown_table(by_attribute).to_csv(plots / "breakdown.csv", index=False)
    roc, pr = m.roc_curves(targets, probs, labels), m.pr_curves(targets, probs, labels)
    roc.to_csv(plots / "roc.csv", index=False)
    pr.to_csv(plots / "pr.csv", index=False)
    auc = results["ensemble"].get("roc_auc")
    curves_plot(
        roc,
        pr,
        plots / "curves.png",
        "test, ensemble" + (f" (ROC AUC {auc:.3f})" if auc is not None else ""),
    )
    _worst(test, table, probs, worst_k, plots)
    return results


def matrix_to_text(matrix: np.ndarray, labels: list[str]) -> str:
    """The confusion matrix as an aligned text table (rows true, columns predicted)."""
    width = max(len(label) for label in labels) + 1
    lines = ["true \\ predicted".ljust(width) + " ".join(label.rjust(width) for label in labels)]
    for label, row in zip(labels, matrix, strict=True):
        lines.append(label.ljust(width) + " ".join(str(v).rjust(width) for v in row))
    return "\n".join(lines) + "\n"


def _replace_dir(path: Path) -> None:
    """Empty a generated folder so that files from an earlier run (old classes) do not linger."""
    if path.exists():
        for child in path.iterdir():
            child.unlink()
    path.mkdir(parents=True, exist_ok=True)


def _worst(
    test: HeldOut, table: pd.DataFrame, probs: np.ndarray, k: int, plots: Path
) -> pd.DataFrame:
    """The k test clips whose true class got the lowest probability: CSV and spectrograms."""
    order = m.worst_predictions(test.targets, probs, k)
    return _write_worst(
        test,
        table,
        order,
        lambda row: (
            f"true {row['actual']} (p={row['p_actual']:.3f}), "
            f"predicted {row['predicted']} (p={row['confidence']:.3f})"
        ),
        plots,
    )


def _write_worst(
    test: HeldOut, table: pd.DataFrame, order: np.ndarray, caption, plots: Path
) -> pd.DataFrame:
    """worst.csv (the `order` rows of `table`, ranked) and one spectrogram per clip in
    worst/, titled with the file and `caption(row)`."""
    worst = table.iloc[order].reset_index(drop=True)
    worst.insert(0, "rank", np.arange(1, len(worst) + 1))
    images = []
    _replace_dir(plots / "worst")
    for rank, i in enumerate(order, start=1):
        row = table.iloc[i]
        image = f"worst/{rank:02d}_{safe_name(Path(row['path']).stem)}.png"
        spectrogram_plot(
            test.features[i], plots / image, f"#{rank} {row['path']}\n{caption(row)}", test.hop_s
        )
        images.append(image)
    worst["image"] = images
    worst.to_csv(plots / "worst.csv", index=False)
    return worst


def regression_report(
    test: HeldOut,
    per_seed_predictions: dict[str, np.ndarray],
    metric: str,
    breakdown_by: tuple[str, ...],
    worst_k: int,
    metrics_dir: Path,
    plots: Path,
    members: dict[str, dict[str, float]] | None = None,
    extra: dict | None = None,
) -> dict:
    """The regression counterpart of `classification_report`, writing the same files.

    `test.targets` are the true values `(clips,)` and each seed's predictions `(clips,)`.
    MAE, RMSE and R^2 per seed, mean +- std, and of the averaged prediction (test.json,
    headline.json). Scored by level (the true value rounded to an integer, as S5's 1-5
    valence): classes.json and classes.csv give per level the MAE, the share predicted within
    0.5 (`accuracy`) and the support; confusion.csv/.txt/.png cross the rounded true and
    predicted levels. breakdown.json and breakdown.csv: n, the share within 0.5, MAE, RMSE
    and R^2 per attribute value. worst.csv and worst/*.png: the largest absolute errors with
    their spectrograms (S5's error analysis). curves.png is the predicted-vs-true and residual
    plot, scatter.csv its data; roc.csv and pr.csv hold their header only.
    """
    missing = [c for c in breakdown_by if c not in test.index.columns]
    if missing:
        raise EvaluationError(
            f"evaluate.breakdown: column(s) {', '.join(missing)} not in the feature index "
            f"(have: {', '.join(test.index.columns)}); add them to the manifest"
        )
    targets = np.asarray(test.targets, dtype=np.float64)
    per_seed = members or {
        s: m.regression_metrics(targets, p) for s, p in per_seed_predictions.items()
    }
    predicted = np.mean(list(per_seed_predictions.values()), axis=0)
    results = summarise(per_seed, m.regression_metrics(targets, predicted), len(targets))
    results.update(extra or {})
    errors = np.abs(predicted - targets)
    levels = np.rint(targets).astype(int)
    guessed = np.rint(predicted).astype(int)
    names = sorted(set(levels) | set(guessed))
    by_level = {
        str(level): {
            "accuracy": float((errors[levels == level] <= 0.5).mean()),
            "mae": float(errors[levels == level].mean()),
            "support": int((levels == level).sum()),
        }
        for level in sorted(set(levels))
    }
    by_attribute = {}
    for column in breakdown_by:
        values = test.index[column].astype(str).to_numpy()
        by_attribute[column] = {
            value: {
                "n": int((values == value).sum()),
                "accuracy": float((errors[values == value] <= 0.5).mean()),
                **m.regression_metrics(targets[values == value], predicted[values == value]),
            }
            for value in sorted(set(values))
        }
    _write_json(metrics_dir / "test.json", results)
    _write_json(metrics_dir / "headline.json", headline(results, metric))
    _write_json(metrics_dir / "classes.json", by_level)
    _write_json(metrics_dir / "breakdown.json", by_attribute)

    plots.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(
        {
            "path": test.index["path"].to_numpy(),
            "actual": targets,
            "predicted": predicted.round(4),
            "residual": (predicted - targets).round(4),
        }
    )
    table.to_csv(plots / "scatter.csv", index=False)
    table.to_csv(plots / "test_predictions.csv", index=False)
    pd.DataFrame({"actual": levels.astype(str), "predicted": guessed.astype(str)}).to_csv(
        plots / "confusion.csv", index=False
    )
    pd.DataFrame(
        [{"class": k, **v} for k, v in by_level.items()], columns=["class", "accuracy", "support"]
    ).to_csv(plots / "classes.csv", index=False)
    index = {level: i for i, level in enumerate(names)}
    matrix = np.zeros((len(names), len(names)), dtype=np.int64)
    for true, guess in zip(levels, guessed, strict=True):
        matrix[index[true], index[guess]] += 1
    labels = [str(n) for n in names]
    (plots / "confusion.txt").write_text(matrix_to_text(matrix, labels))
    confusion_matrix_plot(
        matrix, labels, plots / "confusion.png", "test, rounded true vs predicted value"
    )
    breakdown_table(by_attribute).to_csv(plots / "breakdown.csv", index=False)
    for name, x, y in (("roc", "fpr", "tpr"), ("pr", "recall", "precision")):
        # no curves for a regression model; the files exist because the DVC plots name them
        pd.DataFrame(columns=["class", x, y, "threshold"]).to_csv(
            plots / f"{name}.csv", index=False
        )
    regression_plots(
        targets,
        predicted,
        plots / "curves.png",
        f"test, mean of {len(per_seed_predictions)} (MAE {results['ensemble']['mae']:.3g})",
    )
    order = np.argsort(-errors, kind="stable")[:worst_k]
    _write_worst(
        test,
        table,
        order,
        lambda row: f"true {row['actual']:.3g}, predicted {row['predicted']:.3g}",
        plots,
    )
    return results

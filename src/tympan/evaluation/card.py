"""The test-set fingerprint that promotion compares, and the model card of a registered version.

The card is markdown built only from files the pipeline wrote (split report, test metrics,
per-class and per-attribute tables, the registration decision), so it states what was measured
and nothing else. It is logged with the run, set as the model version's description, and kept
in `reports/model_card.md`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from tympan.config import flatten

LOWER_IS_BETTER = frozenset({"mae", "rmse"})


def fingerprint(index: pd.DataFrame) -> dict[str, Any]:
    """Hash of the test clips (their audio sha256 and label), with counts, for `index` rows of
    the test split. Two evaluations are comparable only when their hashes are equal. With CV
    every recording is tested once and its fold is part of the hash: another fold assignment
    is another protocol."""
    pairs = index["sha256"].astype(str) + ":" + index["label"].astype(str)
    if "cv_fold" in index.columns:
        pairs = pairs + ":fold" + index["cv_fold"].astype(str)
    pairs = sorted(pairs)
    digest = hashlib.sha256("\n".join(pairs).encode()).hexdigest()[:16]
    return {
        "hash": digest,
        "clips": len(index),
        "groups": int(index["group"].nunique()),
        "per_class": {
            str(k): int(v) for k, v in index["label"].value_counts().sort_index().items()
        },
    }


def promotion(
    metric: str,
    value: float,
    test_hash: str,
    champion: dict[str, str] | None,
    min_delta: float,
    original: tuple[str, ...] | None = None,
) -> tuple[str, str]:
    """-> (`champion` or `challenger`, the reason). Pure: the registry is read by the caller.

    `champion` holds the current champion's version and tags (`version`, `test_<metric>`,
    `tympan.test_set`). A new version takes `champion` only when there is none, or when both
    were tested on the same test set and it beats the champion by more than `min_delta`
    (lower is better for MAE and RMSE). A model run under a study's original protocol
    (`original`: the leaks it reproduces, perhaps none) is never champion.
    """
    if original is not None:
        leaks = ", ".join(original) or "no known leak"
        return "challenger", (
            f"run under the study's original protocol ({leaks}), for comparison only: "
            "never champion"
        )
    if champion is None:
        return "champion", "no champion yet"
    version = champion["version"]
    their_hash = champion.get("tympan.test_set")
    if their_hash is None:
        return "challenger", (
            f"champion v{version} has no test-set hash to compare with (registered before "
            "tympan recorded one); promote by hand if intended"
        )
    if their_hash != test_hash:
        return "challenger", (
            f"not comparable with champion v{version}: tested on a different test set "
            f"({test_hash} vs {their_hash}); promote by hand if intended"
        )
    best = float(champion.get(f"test_{metric}", "nan"))
    if math.isnan(best):
        return "challenger", f"champion v{version} has no test_{metric} tag to compare with"
    lower = metric in LOWER_IS_BETTER
    gain = best - value if lower else value - best
    if gain > min_delta:
        verdict, alias = "beats", "champion"
    else:
        verdict, alias = "does not beat", "challenger"
    direction = "lower" if lower else "higher"
    return alias, (
        f"test {metric} {value:.4f} {verdict} champion v{version} ({best:.4f}) by more than "
        f"{min_delta} ({direction} is better; same test set {test_hash})"
    )


def leak_detail(leak: dict[str, Any]) -> str:
    """What one leak of a split report's `protocol.leaks` let through, in numbers."""
    name = leak["leak"]
    if name == "group_in_two_splits":
        return (
            f"{leak['groups_in_two_splits']} of {leak['groups']} groups in two splits; "
            f"{leak['test_recordings_with_group_in_train']} of {leak['test_recordings']} test "
            "recordings share their group with training"
        )
    if name == "augmented_test_copies":
        copies, clips = leak["copies_of_val_and_test"], leak["val_and_test_recordings"]
        return f"{copies} augmented copies of {clips} val and test recordings in training"
    if name == "whole_set_statistics":
        return (
            f"{leak['val_and_test_recordings_in_statistics']} val and test recordings in the "
            "normalisation statistics"
        )
    return leak.get("what", name)


def protocol_lines(protocol: dict[str, Any] | None) -> list[str]:
    """A split report's `protocol` block, loudly: nothing for an honest run; for a study's
    original protocol, that it is one and each leak it reproduces with what leaked."""
    if not protocol or protocol.get("kind") != "original":
        return []
    lines = ["PROTOCOL ORIGINAL: the study's own protocol, rerun for comparison only"]
    for leak in protocol["leaks"]:
        lines.append(f"LEAK {leak['leak']} ({leak['what']}): {leak_detail(leak)}")
    if not protocol["leaks"]:
        lines.append("no known leak: the study's own split and settings")
    return lines


@dataclass
class CardInputs:
    """What the card is written from (all read from pipeline outputs)."""

    name: str
    version: str
    alias: str
    reason: str
    preset: str
    metric: str
    tags: dict[str, str]
    split: dict[str, Any]
    test_set: dict[str, Any]
    results: dict[str, Any]
    classes: dict[str, dict[str, float]] = field(default_factory=dict)
    breakdown: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    # how train's values were tuned (models/train.json `tuning`): protocol, and per fold
    tuning: dict[str, Any] = field(default_factory=dict)
    # a side-by-side table of this model under other protocols (compare-protocols), markdown
    comparison: str = ""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def known_limits(card: CardInputs) -> list[str]:
    """Limits read off the evidence: sample size, split kind, weakest class and subgroup."""
    limits = []
    protocol = card.split.get("protocol") or {}
    if protocol.get("kind") == "original":
        leaks = ", ".join(leak["what"] for leak in protocol["leaks"]) or "none known"
        limits.append(
            f"Run under the study's original protocol (leaks: {leaks}): its figures show what "
            "the study measured, not how the model does on unseen recordings, and are not "
            "comparable with an honest run's."
        )
    n = card.test_set["clips"]
    value = card.results["ensemble"].get(card.metric)
    regression = "mae" in card.results["ensemble"]
    if regression:
        limits.append(
            f"Regression on {n} test clips: MAE {card.results['ensemble']['mae']:.3f}, seed "
            f"spread +-{card.results['seed_std'].get('mae', float('nan')):.3f}."
        )
    elif value is not None and 0 <= value <= 1 and n:
        half = 1.96 * math.sqrt(value * (1 - value) / n)
        limits.append(
            f"Test set of {n} clips from {card.test_set['groups']} groups: the {card.metric} "
            f"{value:.3f} has a binomial 95% interval of about +-{half:.3f}; the seed spread "
            f"is +-{card.results['seed_std'].get(card.metric, float('nan')):.3f}."
        )
    strategy = card.split.get("strategy")
    cv = card.split.get("cv")
    if cv:
        limits.append(
            f"{cv['folds']}-fold cross-validation: every recording is tested once, by the "
            "members that did not see its fold; the served model averages all folds' members, "
            "each trained on part of the data, and has no held-out figure of its own."
        )
    if (card.split.get("tuning") or {}).get("kind") == "nested_cv":
        limits.append(
            "Tuned per fold (nested CV): the out-of-fold figure measures the whole procedure, "
            "tuning included, on recordings its tuning never saw; each fold's members use "
            "that fold's own tuned values, so the figure belongs to no single set of values."
        )
    if strategy == "stratified":
        limits.append(
            "Split is stratified by recording, not by group: the same speaker or session can "
            "appear in training and test, so the figures overstate accuracy on unseen ones."
        )
    elif strategy == "group":
        limits.append(
            f"Split by group ({card.split.get('groups', {}).get('test', '?')} test groups never "
            "seen in training); performance on groups unlike these is not measured."
        )
    if card.classes and regression:
        worst = max(card.classes.items(), key=lambda kv: kv[1]["mae"])
        limits.append(
            f"Largest errors at true value {worst[0]} (MAE {worst[1]['mae']:.3f} on "
            f"{worst[1]['support']} clips)."
        )
    elif card.classes:
        worst = min(card.classes.items(), key=lambda kv: kv[1]["accuracy"])
        limits.append(
            f"Weakest class: {worst[0]} (accuracy {worst[1]['accuracy']:.3f} on "
            f"{worst[1]['support']} clips)."
        )
    key = "mae" if regression else "accuracy"
    for attribute, values in card.breakdown.items():
        if len(values) > 1:
            low = min(values.items(), key=lambda kv: kv[1][key])
            high = max(values.items(), key=lambda kv: kv[1][key])
            limits.append(
                f"By {attribute}: {key} from {low[1][key]:.3f} ({attribute}={low[0]}, "
                f"{low[1]['n']} clips) to {high[1][key]:.3f} ({attribute}={high[0]})."
            )
    features = card.params.get("features", {})
    if features:
        limits.append(
            f"Inputs are resampled to {features.get('sample_rate')} Hz and mixed to mono; "
            f"the model sees {features.get('seconds')} s windows: shorter audio is padded, "
            "longer audio is windowed and the windows' probabilities are combined."
        )
    side = card.params.get("model", {}).get("side_attributes") or []
    if side:
        limits.append(
            f"Requests must carry {', '.join(side)}; values unseen in training are refused."
        )
    return limits


def tuning_lines(split: dict[str, Any], tuning: dict[str, Any]) -> list[str]:
    """The tuning protocol behind the headline, from the split report (`tuning`), and a
    warning when train's record (`tuning`) says it trained otherwise."""
    said = split.get("tuning")
    if not said:
        return []
    lines = [f"Tuning: {said['text']}."]
    used = tuning.get("protocol")
    if used and used != said["kind"]:
        lines.append(
            f"**Tuning mismatch: the split report names `{said['kind']}`, but train used "
            f"`{used}` values; the headline comes from train's.**"
        )
    return lines


def split_line(split: dict[str, Any]) -> str:
    """The split and its leak checks as a sentence, from the split report."""
    how = {
        "group": "by group",
        "stratified": "stratified by label, recording by recording",
        "predefined": f"on the manifest's `{split.get('column')}` column",
    }.get(split.get("strategy"), f"`{split.get('strategy')}`")
    cv = split.get("cv")
    if cv:
        source = f"from the `{cv['column']}` column" if cv.get("column") else "dealt by group"
        head = f"{cv['folds']}-fold cross-validation, folds {source}; each fold split {how}"
    else:
        head = f"Split {how} (seed {split.get('seed')})"
    checks = split.get("checks")
    if not checks:
        return f"{head}."
    groups = checks.get("groups_checked", "?")
    files = checks.get("sha256_checked", "?")
    leaks = checks.get("groups_in_two_splits", 0) + checks.get("identical_files_in_two_splits", 0)
    verdict = "none is in two splits" if not leaks else f"{leaks} found in two splits"
    scope = " of every fold" if cv else ""
    return f"{head}; {groups} groups and {files} distinct files checked{scope}: {verdict}." + (
        _similar_sentence(split["similar"]) if split.get("similar") else ""
    )


def _similar_sentence(similar: dict[str, Any]) -> str:
    """The content check (`split.similar`) as a sentence: what it found and what was done."""
    found = similar.get("pairs_in_different_groups", 0)
    across = similar.get("pairs_in_two_splits_per_fold") or [similar.get("pairs_in_two_splits", 0)]
    head = (
        f" Content check (landmark fingerprints, similarity >= {similar.get('threshold')}): "
        f"{found} pair(s) of recordings in different groups sound the same"
    )
    if similar.get("merged_group_count"):
        return (
            f"{head}; their groups were merged ({similar['merged_group_count']}) before splitting."
        )
    if any(across):
        where = f"{across} per fold" if len(across) > 1 else str(across[0])
        return f"{head}; {where} of them sit in two splits (`split.similar: report`)."
    return f"{head}; none sits in two splits." if found else f"{head}."


def model_card(card: CardInputs) -> str:
    """The card as markdown."""
    ens, mean, std = (card.results[k] for k in ("ensemble", "seed_mean", "seed_std"))
    seeds = card.results.get("seeds", {})
    metrics_rows = [
        [k, f"{ens[k]:.4f}", f"{mean[k]:.4f} +- {std[k]:.4f}" if k in mean else "-"] for k in ens
    ]
    split_rows = [
        [s, card.split.get("recordings", {}).get(s, "?"), card.split.get("groups", {}).get(s, "?")]
        for s in ("train", "val", "test")
    ]
    tag = card.tags.get
    title = (
        f"{card.name} v{card.version} (@{card.alias})"
        if card.version
        else f"{card.name} (not registered)"
    )
    parts = [
        f"# Model card: {title}",
        "",
        f"Promotion: {card.reason}.",
        "",
        *(f"**{line}**" for line in protocol_lines(card.split.get("protocol"))),
        *([""] if protocol_lines(card.split.get("protocol")) else []),
        "## Data",
        "",
        f"- Preset: `{card.preset}`; git commit `{tag('git.commit', 'unknown')}`",
        f"- DVC data hash `{tag('dvc.data', 'unknown')}`, manifest `{tag('dvc.manifest', '?')}`, "
        f"features `{tag('dvc.features', 'unknown')}`",
        f"- Test set `{card.test_set['hash']}`: {card.test_set['clips']} clips, "
        f"{card.test_set['groups']} groups",
        *(
            [
                f"- Encoder: {tag('tympan.encoder')}, weights sha256 "
                f"`{tag('tympan.encoder_sha256', '?')}` "
                + (
                    "(fine-tuned from these weights; the tuned weights are inside the model)"
                    if tag("tympan.encoder_finetuned") == "true"
                    else "(frozen; its weights are inside the model)"
                )
            ]
            if tag("tympan.encoder")
            else []
        ),
        f"- {split_line(card.split)}",
        *(f"- {line}" for line in tuning_lines(card.split, card.tuning)),
        "",
        _table(["split", "recordings", "groups"], split_rows),
        "",
        "## Test metrics",
        "",
        (
            f"Out of fold over {card.results['cv']['folds']} CV folds: the ensemble column "
            "scores each recording with its own fold's seeds (averaged probabilities); the "
            f"seeds column is mean +- std over {len(seeds)} fold x seed members. "
            f"Headline: `{card.metric}`. The split table shows fold 0."
            if "cv" in card.results
            else f"Ensemble of {len(seeds)} seeds (averaged probabilities); per-seed mean "
            f"+- std. Headline: `{card.metric}`."
        ),
        "",
        _table(["metric", "ensemble", "seeds"], metrics_rows),
    ]
    if card.classes:
        first = next(iter(card.classes.values()))
        class_keys = [k for k in first if k != "support"]
        parts += [
            "",
            "## Per class" if "precision" in first else "## Per level (true value rounded)",
            "",
            _table(
                ["class", *class_keys, "support"],
                [
                    [c, *(f"{v[k]:.3f}" for k in class_keys), v["support"]]
                    for c, v in card.classes.items()
                ],
            ),
        ]
    for attribute, values in card.breakdown.items():
        keys = [k for k in next(iter(values.values()), {}) if k != "n"]
        parts += [
            "",
            f"## By {attribute}",
            "",
            _table(
                [attribute, "clips", *keys],
                [[k, v["n"], *(f"{v[key]:.3f}" for key in keys)] for k, v in values.items()],
            ),
        ]
    if card.comparison:
        parts += ["", "## Protocols side by side", "", card.comparison.rstrip()]
    per_fold = card.tuning.get("per_fold") or {}
    if per_fold:
        names = sorted({name for fold in per_fold.values() for name in fold["values"]})
        parts += [
            "",
            "## Tuning",
            "",
            "Nested CV: each fold's members trained with the best values of that fold's own "
            "study, which never saw the fold's test recordings.",
            "",
            _table(
                ["fold", "study", "trial", *(f"`{n}`" for n in names)],
                [
                    [k, f"`{v['study']}`", v["trial"], *(v["values"].get(n, "-") for n in names)]
                    for k, v in per_fold.items()
                ],
            ),
        ]
    if card.params:
        flat = [[f"`{key}`", value] for key, value in flatten(card.params).items()]
        parts += [
            "",
            "## Params",
            "",
            "The params that shaped this model: its family's, the training settings that apply "
            "to its task, optimiser and device, the augmentations switched on, and each feature "
            "set's own.",
            "",
            _table(["param", "value"], flat),
        ]
    parts += ["", "## Known limits", ""] + [f"- {line}" for line in known_limits(card)]
    return "\n".join(parts) + "\n"

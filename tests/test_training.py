import itertools
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from tympan.config import AugmentConfig, ModelConfig, TrainConfig
from tympan.models import build_model
from tympan.training import SeedTrainer, fit, predict, resolve_device
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
    # a class the train split lacks weighs as one clip would (scikit-learn refuses it)
    torch.testing.assert_close(
        class_weights(np.array([0, 0, 0, 1]), 3), torch.tensor([4 / 9, 4 / 3, 4 / 3])
    )


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
    probs = predict(result.model, tone_cache.features, rows, 4, torch.device("cpu"))
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


def test_predict_keeps_row_order(tone_cache):
    model = build_model(ModelConfig(channels=4, hidden=8), tuple(tone_cache.features.shape[1:]), 2)
    rows = np.array([5, 1, 9, 3])
    together = predict(model, tone_cache.features, rows, 2, torch.device("cpu"))
    alone = np.concatenate(
        [
            predict(model, tone_cache.features, rows[i : i + 1], 2, torch.device("cpu"))
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
    predict(trainer.model, tone_cache.features, rows, 4, torch.device("cpu"))
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
        predict(trainer.model, cache.features, cache.rows("test"), 4, torch.device("cpu"))
        assert seen == []
    # un-augmented inputs recomputed from the kept waveforms equal the cached features
    same = AugmentedInputs(cache.waves, TONE_FEATURES, AugmentConfig(), 0)[np.arange(6)]
    np.testing.assert_allclose(same, cache.features[np.arange(6)], atol=0.05)
    with pytest.raises(ValueError, match=r"augment\.wave_\* needs the waveforms"):
        SeedTrainer(plain, model_cfg, cfg, 0, torch.device("cpu"), augment)


# --- optimisers, losses, sampling, checkpoints (issue 4) ---------------------------------

SMALL = ModelConfig(channels=8, hidden=16)
CPU = torch.device("cpu")


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adagrad"])
def test_every_optimizer_learns(tone_cache, optimizer):
    lr = {"adam": 1e-3, "sgd": 0.05, "adagrad": 0.05}[optimizer]
    cfg = TrainConfig(epochs=6, batch_size=8, lr=lr, optimizer=optimizer, patience=6)
    result = fit(tone_cache, SMALL, cfg, 0, CPU, progress=False)
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.history[result.best_epoch - 1].val_accuracy > 0.8


def test_gradient_clipping_bounds_every_step(tone_cache):
    """Plain SGD moves each weight by lr * (clipped gradient): after one epoch of n steps the
    weights moved at most n * lr * grad_clip."""
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.1, optimizer="sgd", momentum=0.0, grad_clip=1e-3)
    trainer = SeedTrainer(tone_cache, SMALL, cfg, 0, CPU)
    before = _weights(trainer.model).clone()
    trainer.step()
    steps = -(-len(tone_cache.rows("train")) // 8)
    moved = (_weights(trainer.model) - before).norm().item()
    assert 0 < moved <= steps * 0.1 * 1e-3 * (1 + 1e-4)
    free = SeedTrainer(tone_cache, SMALL, replace(cfg, grad_clip=0.0), 0, CPU)
    free.step()
    assert (_weights(free.model) - before).norm().item() > 10 * moved


def test_binary_cross_entropy_has_one_output_and_two_probabilities(tone_cache):
    cfg = TrainConfig(epochs=4, batch_size=8, loss="bce", patience=4)
    result = fit(tone_cache, SMALL, cfg, 0, CPU, progress=False)
    assert result.model.net.head[-1].out_features == 1
    probs = predict(
        result.model, tone_cache.features, tone_cache.rows("test"), 4, CPU, head="sigmoid"
    )
    assert probs.shape == (len(tone_cache.rows("test")), 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert {"val_accuracy", "val_f1_macro", "val_precision", "val_recall"} <= set(
        result.history[-1].val
    )
    three = replace(tone_cache, labels=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"train\.loss=bce needs exactly two classes"):
        SeedTrainer(three, SMALL, cfg, 0, CPU)


def test_undersampling_draws_the_smallest_class_count_each_epoch(tone_cache):
    from tympan.training.loop import undersample

    rng = np.random.default_rng(0)
    targets = np.array([0] * 10 + [1] * 3 + [2] * 5)
    rows = np.arange(18)
    first, second = undersample(rows, targets, rng), undersample(rows, targets, rng)
    for drawn in (first, second):
        assert np.bincount(targets[drawn]).tolist() == [3, 3, 3]
    assert not np.array_equal(first, second)  # a new draw every epoch
    with pytest.raises(ValueError, match="choose one"):  # class_weights defaults to true
        SeedTrainer(tone_cache, SMALL, TrainConfig(undersample=True), 0, CPU)
    trainer = SeedTrainer(
        tone_cache, SMALL, TrainConfig(undersample=True, class_weights=False), 0, CPU
    )
    drawn = trainer._epoch_rows()
    assert np.bincount(tone_cache.targets()[drawn]).tolist() == [16, 16]


def test_regression_trains_on_the_target_column(tone_cache, tmp_path):
    from tympan.features.cache import FeatureCache

    index = tone_cache.index.assign(target=np.where(tone_cache.targets() == 0, 1.0, 5.0))
    cache = FeatureCache(
        tone_cache.features, index, tone_cache.labels, tone_cache.mean, tone_cache.std, {}
    )
    cfg = TrainConfig(task="regression", loss="l1", epochs=8, batch_size=8, lr=3e-3, patience=8)
    result = fit(cache, SMALL, cfg, 0, CPU, progress=False)
    assert result.model.net.head[-1].out_features == 1
    assert {"val_mae", "val_rmse"} <= set(result.history[-1].val)  # no R^2: every val target is 5
    assert result.history[result.best_epoch - 1].val["val_mae"] < 1.0
    values = predict(result.model, cache.features, cache.rows("val"), 4, CPU, head="identity")
    mae = np.abs(values[:, 0] - index["target"].to_numpy()[cache.rows("val")]).mean()
    assert mae == pytest.approx(result.history[result.best_epoch - 1].val_loss, rel=1e-4)
    with pytest.raises(ValueError, match="needs a numeric 'target' column"):
        SeedTrainer(tone_cache, SMALL, cfg, 0, CPU)
    with pytest.raises(ValueError, match=r"does not fit train\.task=regression"):
        TrainConfig(task="regression", loss="ce")


def test_classical_baseline_fits_through_fit(tone_cache):
    result = fit(tone_cache, ModelConfig(name="logreg"), TrainConfig(), 0, CPU)
    assert result.best_epoch == 1 and len(result.history) == 1
    assert result.history[0].val_accuracy == 1.0
    probs = predict(result.model, tone_cache.features, tone_cache.rows("test"), 8, CPU)
    assert (probs.argmax(1) == tone_cache.targets()[tone_cache.rows("test")]).all()


def test_a_resumed_run_ends_exactly_like_an_uninterrupted_one(tone_cache, tmp_path):
    """Stopped after 3 epochs and restarted from the checkpoint: the same history, the same
    best epoch and the same final weights as training straight through (augmentation on, so
    every random stream must be restored)."""
    cfg = TrainConfig(epochs=7, batch_size=8, patience=7, lr=2e-3)
    augment = AugmentConfig(noise_std=1.0, time_shift=0.1, freq_masks=1, freq_mask_width=3)
    straight = fit(tone_cache, SMALL, cfg, 3, CPU, progress=False, augment=augment)

    path = tmp_path / "member.pt"
    first = SeedTrainer(tone_cache, SMALL, cfg, 3, CPU, augment, path, "run-a")
    for _ in range(3):
        first.step()
    del first  # the process dies here; only the checkpoint remains
    resumed = fit(
        tone_cache,
        SMALL,
        cfg,
        3,
        CPU,
        progress=False,
        augment=augment,
        checkpoint=path,
        fingerprint="run-a",
    )
    assert resumed.resumed_at == 3
    assert [e.flat() for e in resumed.history] == [e.flat() for e in straight.history]
    assert resumed.best_epoch == straight.best_epoch
    torch.testing.assert_close(_weights(resumed.model), _weights(straight.model), rtol=0, atol=0)
    other = SeedTrainer(tone_cache, SMALL, cfg, 3, CPU, augment, path, "run-b")
    assert other.result.history == []  # another run's checkpoint is not used


def test_early_stopping_and_the_lr_schedule_are_optional(tone_cache):
    """S2, S3 and S5 had neither: every epoch runs and the LR stays put. With both on, a
    patience of 1 stops at the first epoch without a lower val loss and the plateau cuts
    the LR."""
    off = TrainConfig(
        epochs=6, batch_size=8, lr=0.05, patience=1, early_stopping=False, lr_schedule="none"
    )
    result = fit(tone_cache, SMALL, off, 0, CPU, progress=False)
    assert len(result.history) == 6 and not result.stopped_early
    assert {e.lr for e in result.history} == {0.05}
    losses = [e.val_loss for e in result.history]
    assert any(b >= a for a, b in itertools.pairwise(losses))  # patience 1 would stop
    on = replace(off, early_stopping=True, lr_schedule="plateau", lr_patience=0, lr_factor=0.5)
    trainer = SeedTrainer(tone_cache, SMALL, on, 0, CPU)
    while not trainer.done:
        trainer.step()
    assert trainer.result.stopped_early and len(trainer.result.history) < 6
    assert trainer.optimizer.param_groups[0]["lr"] == 0.025  # cut after the stopping epoch


@pytest.mark.parametrize("keep", ["best_val_loss", "best_val_accuracy", "last"])
def test_keep_names_the_epoch_whose_weights_the_member_holds(tone_cache, keep):
    cfg = TrainConfig(epochs=5, batch_size=8, lr=0.05, early_stopping=False, keep=keep)
    trainer = SeedTrainer(tone_cache, SMALL, cfg, 0, CPU)
    states = []
    while not trainer.done:
        trainer.step()
        states.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    history = trainer.result.history
    expected = {
        "best_val_loss": min(history, key=lambda e: e.val_loss).epoch,
        "best_val_accuracy": max(history, key=lambda e: e.val_accuracy).epoch,  # first max
        "last": len(history),
    }[keep]
    result = trainer.finish()
    assert result.best_epoch == expected and trainer.best.epoch == expected
    for name, value in result.model.state_dict().items():
        torch.testing.assert_close(value, states[expected - 1][name], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"best_val_accuracy needs train\.task=classification"):
        TrainConfig(task="regression", keep="best_val_accuracy")

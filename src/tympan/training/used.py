"""The params a trained model actually used: what MLflow records and the model card lists.

params.yaml holds every key of every family and augmentation, most of them unused by any one
run (`model.filters` means nothing to the S3 CNN, `train.momentum` nothing to Adam, the
augment section nothing when it is off). A run's record lists only what shaped its model:
the feature sets' own params (`features.stack.set_params`, the same keys the cache is keyed
by), the model family's fields, the training params that apply to its task, optimiser and
device, the augmentations that are on, and the window params the served model applies.
"""

from __future__ import annotations

from typing import Any

from tympan.config import Params, to_dict
from tympan.features.stack import set_params
from tympan.models.registry import model_fields


def used_params(params: Params, cuda: bool) -> dict[str, dict[str, Any]]:
    """`{section: {key: value}}` of the params that shaped the model (lists for tuples);
    `cuda`: whether it trained on a GPU (mixed precision and channels-last apply only there).
    A section with nothing in use (augment when all off) is left out."""
    used = {
        "features": _features(params),
        "segment": to_dict(params.segment),  # the served model windows long audio with these
        "model": _pick(params.model, model_fields(params.model)),
        "train": _pick(params.train, _train_fields(params, cuda)),
        "augment": {} if params.model.classical else _pick(params.augment, _augment_fields(params)),
    }
    return {section: values for section, values in used.items() if values}


def _pick(section: Any, names: tuple[str, ...]) -> dict[str, Any]:
    values = to_dict(section)
    return {name: values[name] for name in names}


def _features(params: Params) -> dict[str, Any]:
    """What each stacked feature set depends on (its cache key), the stacking order and the
    image resize; the featurize-time settings (`batch_size`, `workers`, `device`) change no
    value and are left out."""
    features, stack = params.features, params.features.stack
    keys = {k for kind in stack.kinds for k in set_params(kind, features, stack)} - {"kind"}
    top = to_dict(features)
    chosen = {k: top[k] for k in top if k in keys}
    nested = {k: to_dict(stack)[k] for k in to_dict(stack) if k in keys}
    nested["kinds"] = list(stack.kinds)
    if stack.image is not None:
        nested.update(image=list(stack.image), image_channels=stack.image_channels)
    return {**chosen, "stack": nested}


def _train_fields(params: Params, cuda: bool) -> tuple[str, ...]:
    cfg = params.train
    if params.model.classical:  # one fit per seed; no optimiser, epochs or loss
        return ("seeds", "task")
    names = ["seeds", "epochs", "batch_size", "task", "loss", "optimizer", "lr", "weight_decay"]
    if cfg.optimizer == "sgd":
        names.append("momentum")
    names += ["grad_clip", "patience", "lr_factor", "lr_patience", "min_lr"]
    if cfg.task == "classification":
        names += ["class_weights", "undersample"]
    if cuda:
        names += ["amp", "channels_last"]
    return tuple(names)


def _augment_fields(params: Params) -> tuple[str, ...]:
    cfg = params.augment
    names: list[str] = []
    if cfg.noise:
        names += ["noise_std", "noise_p"]
    if cfg.time_shift > 0:
        names.append("time_shift")
    if cfg.pitch_shift > 0:
        names.append("pitch_shift")
    if cfg.time_masks > 0:
        names += ["time_masks", "time_mask_width"]
    if cfg.freq_masks > 0:
        names += ["freq_masks", "freq_mask_width"]
    if cfg.mixup_alpha > 0:
        names.append("mixup_alpha")
    if cfg.waveform:
        names += [n for n in ("wave_snr_db", "wave_pitch") if getattr(cfg, n)] + ["wave_p"]
    return tuple(names)

"""Train one model per seed on cached features: Adam, early stopping, LR on plateau.

`fit` is the single training function: the `train` stage calls it once per seed, and the tune
stage (later) will call the same function per trial.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tympan.config import ModelConfig, TrainConfig
from tympan.evaluation.metrics import classification_metrics
from tympan.features import FeatureCache
from tympan.models import AudioClassifier, build_model


@dataclass(frozen=True)
class EpochLog:
    """One row of the learning curve."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_f1_macro: float
    lr: float


@dataclass
class SeedResult:
    """A trained member: best weights (restored) and its history."""

    seed: int
    model: AudioClassifier
    history: list[EpochLog] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(
    features: np.ndarray,
    rows: np.ndarray,
    targets: np.ndarray,
    batch_size: int,
    device: torch.device,
    rng: np.random.Generator | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `(batch, 1, n_mels, frames)` float32 inputs and `(batch,)` targets from the memmap."""
    order = rows[rng.permutation(len(rows))] if rng is not None else rows
    pin = device.type == "cuda"
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        x = torch.from_numpy(np.asarray(features[np.sort(chunk)], dtype=np.float32))
        y = torch.from_numpy(targets[np.sort(chunk)])
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        yield x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)


@torch.no_grad()
def predict_proba(
    model: nn.Module, features: np.ndarray, rows: np.ndarray, batch_size: int, device: torch.device
) -> np.ndarray:
    """Class probabilities `(len(rows), n_classes)` for the given rows, in row order."""
    model.eval()
    dummy = np.zeros(len(features), dtype=np.int64)
    sorted_rows = np.sort(rows)
    out = [
        torch.softmax(model(x), dim=1).cpu()
        for x, _ in _batches(features, sorted_rows, dummy, batch_size, device, None)
    ]
    probs = torch.cat(out).numpy() if out else np.zeros((0, 0))
    position = {r: i for i, r in enumerate(sorted_rows)}
    return probs[[position[r] for r in rows]]


def class_weights(targets: np.ndarray, n_classes: int) -> torch.Tensor:
    """Balanced weights `n / (n_classes * count_c)`, as scikit-learn's `balanced`."""
    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    weights = len(targets) / (n_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def fit(
    cache: FeatureCache,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> SeedResult:
    """Train one seed; stop after `cfg.patience` epochs without a lower val loss.

    The returned model holds the weights of its best epoch (lowest validation loss).
    """
    seed_everything(seed)
    targets = cache.targets()
    train_rows, val_rows = cache.rows("train"), cache.rows("val")
    n_classes = len(cache.labels)
    input_shape = tuple(cache.features.shape[2:])
    model = build_model(
        model_cfg, input_shape, n_classes, torch.from_numpy(cache.mean), torch.from_numpy(cache.std)
    ).to(device)
    weight = class_weights(targets[train_rows], n_classes).to(device) if cfg.class_weights else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.min_lr
    )
    rng = np.random.default_rng(seed)
    result = SeedResult(seed=seed, model=model)
    best_loss, best_state, waited = float("inf"), copy.deepcopy(model.state_dict()), 0
    val_targets = targets[val_rows]
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"seed {seed}", unit="epoch")
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        for x, y in _batches(cache.features, train_rows, targets, cfg.batch_size, device, rng):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
        probs = predict_proba(model, cache.features, val_rows, cfg.batch_size, device)
        val_loss = _nll(probs, val_targets, weight)
        metrics = classification_metrics(val_targets, probs)
        entry = EpochLog(
            epoch,
            total / max(count, 1),
            val_loss,
            metrics["accuracy"],
            metrics["f1_macro"],
            optimizer.param_groups[0]["lr"],
        )
        result.history.append(entry)
        bar.set_postfix(
            loss=f"{entry.train_loss:.3f}",
            val_loss=f"{val_loss:.3f}",
            val_acc=f"{entry.val_accuracy:.3f}",
            val_f1=f"{entry.val_f1_macro:.3f}",
        )
        if on_epoch is not None:
            on_epoch(entry)
        plateau.step(val_loss)
        if val_loss < best_loss:
            best_loss, best_state, waited = val_loss, copy.deepcopy(model.state_dict()), 0
            result.best_epoch = epoch
        else:
            waited += 1
            if waited >= cfg.patience:
                result.stopped_early = True
                break
    bar.close()
    model.load_state_dict(best_state)
    return result


def _nll(probs: np.ndarray, targets: np.ndarray, weight: torch.Tensor | None) -> float:
    """Cross-entropy of probabilities, weighted like the training loss (weighted mean)."""
    picked = -np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None))
    if weight is None:
        return float(picked.mean())
    w = weight.cpu().numpy()[targets]
    return float((picked * w).sum() / w.sum())

